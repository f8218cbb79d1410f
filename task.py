"""
The post-training task, in one place: "Write a story that uses the words: ... (and has these
features)", in the spirit of the TinyStories paper's instruct set. SFT, eval, the preference
data, DPO, PPO and GRPO all build prompts and score answers with these functions.

    make_task(story, rng)        required words and features for a plain story (from its own text)
    parse_instruct(doc)          story, words and features of a TinyStories-Instruct record
    make_prompt(words, features) the instruction text
    score(text, words, features, ended)   the reward rule: a dict with 'score' in [0, 1]

The rule (exact and cheap):
  words     share of the required words present as whole words, case-insensitive, in any of the
            inflections listed in `inflections` (jump: jumps, jumped, jumping; happy: happier,
            happiest, happily; run: running; make: making; cry: cries, cried)
  features  share of the requested features satisfied: 'dialogue' (a quotation in the text),
            'max_sentences' N (at most N sentences)
  ending    1 if the model ended its turn (emitted <|end|>) and the last sentence is complete
            (ends with . ! ? optionally followed by a closing quote), else 0
  repetition  share of the text's word 4-grams that already occurred earlier in it; real stories
            stay under 0.11 (the 24 in ../shared: 0.00-0.11), a loop approaches 1
  score = (0.6 words + 0.2 features + 0.2 ending) * (1 - clip((repetition - 0.2) / 0.6, 0, 1))
"""

import math
import re

STOP_WORDS = set('''a an the and or but so if then than that this these those there their they them
he she it its his her him we us our you your i me my mine was were is are be been being am do does
did done have has had having to of in on at by for from with without into onto over under up down
out off about after before again all any both each few more most other some such no nor not only
own same too very can will just should now one two three day time once upon said says say went go
goes going get got saw see look looked let lets would could what when where who why how which
while because also very much many little big too like liked back away here'''.split())

SENTENCE_END = re.compile(r'[.!?]+["”’\']?(?=\s|$)')
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def words_of(text):
    return [w.lower() for w in WORD.findall(text)]


def sentences(text):
    """Sentences of a text: pieces ending in . ! or ? (a closing quote may follow)."""
    parts, start = [], 0
    for m in SENTENCE_END.finditer(text):
        piece = text[start:m.end()].strip()
        if any(ch.isalpha() for ch in piece):
            parts.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if any(ch.isalpha() for ch in tail):
        parts.append(tail)                      # an unfinished last sentence counts too
    return parts


def inflections(word):
    """The forms of `word` the rule accepts: -s/-es, -ed/-d, -ing (with a dropped final e or a
    doubled final consonant), -er/-est, -ly, and y -> ies/ied/ier/iest/ily."""
    w = word.lower()
    forms = {w, w + 's', w + 'es', w + 'ed', w + 'd', w + 'ing', w + 'er', w + 'est', w + 'ly'}
    if w.endswith('e'):
        forms |= {w[:-1] + 'ing', w[:-1] + 'er', w[:-1] + 'est'}
    if len(w) >= 3 and w[-1] not in 'aeiouwy' and w[-2] in 'aeiou' and w[-3] not in 'aeiou':
        forms |= {w + w[-1] + 'ing', w + w[-1] + 'ed', w + w[-1] + 'er', w + w[-1] + 'est'}
    if w.endswith('y') and len(w) > 2:
        forms |= {w[:-1] + 'ies', w[:-1] + 'ied', w[:-1] + 'ier', w[:-1] + 'iest', w[:-1] + 'ily'}
    return forms


def word_used(word, text_words):
    """True if `word` or one of its inflections is a whole word of the text, or the text has a
    word of which `word` is an inflection (the prompt may give 'jumped' and the story 'jump')."""
    forms = inflections(word)
    return any(t in forms or word.lower() in inflections(t) for t in set(text_words))


def repetition(text, n=4):
    """Share of the word n-grams of `text` that already occurred earlier in it."""
    w = words_of(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    seen, dup = set(), 0
    for g in grams:
        dup += g in seen
        seen.add(g)
    return dup / len(grams) if grams else 0.0


def has_dialogue(text):
    return bool(re.search(r'["“][^"”]+["”]', text))


def complete_ending(text):
    return bool(re.search(r'[.!?]["”’\']?\s*$', text.strip())) if text.strip() else False


def score(text, words, features=None, ended=True):
    """The reward rule (see the module docstring). Returns the parts and their 'score'."""
    features = features or {}
    tw = words_of(text)
    used = [w for w in words if word_used(w, tw)]
    words_frac = len(used) / len(words) if words else 1.0
    checks = []
    if features.get('dialogue'):
        checks.append(has_dialogue(text))
    if features.get('max_sentences'):
        checks.append(len(sentences(text)) <= features['max_sentences'])
    features_frac = sum(checks) / len(checks) if checks else 1.0
    ending = float(bool(ended) and complete_ending(text))
    rep = repetition(text)
    penalty = min(1.0, max(0.0, (rep - 0.2) / 0.6))
    total = (0.6 * words_frac + 0.2 * features_frac + 0.2 * ending) * (1 - penalty)
    return {'score': total, 'words': words_frac, 'all_words': len(used) == len(words),
            'features': features_frac, 'ending': ending, 'repetition': rep}


def make_prompt(words, features=None):
    features = features or {}
    prompt = f"Write a story that uses the words: {', '.join(words)}."
    if features.get('dialogue'):
        prompt += ' The story should have dialogue.'
    if features.get('max_sentences'):
        prompt += f" Use at most {features['max_sentences']} sentences."
    return prompt


def choose_features(story, rng, p=0.5):
    """Features the story itself satisfies, each kept with probability p: 'dialogue' if it has
    a quotation, 'max_sentences' = its sentence count rounded up to a multiple of 5."""
    features = {}
    if has_dialogue(story) and rng.random() < p:
        features['dialogue'] = True
    if rng.random() < p:
        features['max_sentences'] = 5 * math.ceil(len(sentences(story)) / 5)
    return features


def make_task(story, rng, n_words=3):
    """Required words and features for a plain story: `n_words` distinct content words of the
    story (no stop words, no names or other capitalised-only words, at least 3 letters, not
    inflections of one another), chosen with `rng`. Without a part-of-speech tagger these are
    content words rather than exactly one noun, one verb and one adjective. None if the story
    has too few."""
    tokens = WORD.findall(story)
    lower_seen = {t for t in tokens if t.islower()}          # appears uncapitalised somewhere
    candidates = sorted({t for t in lower_seen if len(t) >= 3 and t not in STOP_WORDS and "'" not in t})
    rng.shuffle(candidates)
    chosen = []
    for c in candidates:
        if not any(word_used(c, [d]) for d in chosen):
            chosen.append(c)
        if len(chosen) == n_words:
            break
    if len(chosen) < n_words:
        return None
    return {'words': chosen, 'features': choose_features(story, rng)}


def parse_instruct(doc):
    """A TinyStories-Instruct record ('Features: Dialogue, Twist', 'Words: quit, oak, gloomy',
    'Summary: ...', 'Story: ...') -> {'story', 'words', 'features'} with the rule-checkable
    features only (dialogue); None if the record has no story or no words."""
    fields, current = {}, None
    for line in doc.splitlines():
        m = re.match(r'^(Features|Words|Summary|Random sentence|Story):\s*(.*)$', line)
        if m:
            current = m.group(1)
            fields[current] = m.group(2)
        elif current:
            fields[current] += '\n' + line
    story, words = fields.get('Story', '').strip(), fields.get('Words', '').strip()
    if not story or not words:
        return None
    features = {}
    if 'dialogue' in fields.get('Features', '').lower():
        features['dialogue'] = True
    return {'story': story, 'words': [w.strip() for w in words.split(',') if w.strip()],
            'features': features}
