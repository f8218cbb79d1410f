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

import contextlib
import functools
import math
import re

import numpy as np
import torch

from generate import generate_chat

STOP_WORDS = set('''a an the and or but so if then than that this these those there their they them
he she it its his her him we us our you your i me my mine was were is are be been being am do does
did done have has had having to of in on at by for from with without into onto over under up down
out off about after before again all any both each few more most other some such no nor not only
own same too very can will just should now one two three day time once upon said says say went go
goes going get got saw see look looked let lets would could what when where who why how which
while because also very much many little big too like liked back away here'''.split())

SENTENCE_END = re.compile(r'[.!?]+["”’\']?(?=\s|$)')
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")   # on straight_quotes(text): won't, king's are one word


def straight_quotes(text):
    """The text with its typographic apostrophe (’) as ' , the same length: without it WORD read
    won’t as won + t, which uses 'win'."""
    return text.replace('\u2019', "'")


def words_of(text):
    return [w.lower() for w in WORD.findall(straight_quotes(text))]


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


def sentence_chunks(doc, max_words):
    """`doc` cut at sentence ends into consecutive pieces of at most max_words words, each as long
    as it can be; a sentence longer than max_words is dropped (the next piece starts after it), and
    so is text after the last sentence end. Newlines inside a piece are kept."""
    chunks, start, prev, n = [], 0, 0, 0
    for m in SENTENCE_END.finditer(doc):
        k = len(doc[prev:m.end()].split())     # words of the sentence ending here
        if n + k > max_words:
            if n:
                chunks.append(doc[start:prev].strip())
            start, n = prev, 0
            if k > max_words:
                start = prev = m.end()
                continue
        n += k
        prev = m.end()
    if n:
        chunks.append(doc[start:prev].strip())
    return chunks


# irregular forms a story may use for a word: past tenses and participles, plurals, comparatives
IRREGULAR = {parts[0]: frozenset(parts[1:]) for parts in (entry.split() for entry in """
    begin began begun, bite bit bitten, blow blew blown, break broke broken, bring brought,
    build built, burn burnt, buy bought, catch caught, choose chose chosen, come came, dig dug,
    draw drew drawn, drink drank drunk, drive drove driven, eat ate eaten, fall fell fallen,
    feed fed, feel felt, fight fought, find found, fly flew flown, forget forgot forgotten,
    forgive forgave forgiven, freeze froze frozen, get got gotten, give gave given, go went gone,
    grow grew grown, hang hung, hear heard, hide hid hidden, hold held, keep kept, kneel knelt,
    know knew known, lead led, learn learnt, leave left, lose lost, make made, mean meant, meet met,
    pay paid, ride rode ridden, ring rang rung, rise rose risen, run ran, say said, see saw seen,
    sell sold, send sent, sew sewn, shake shook shaken, shine shone, shoot shot, sing sang sung,
    sink sank sunk, sit sat, sleep slept, slide slid, smell smelt, speak spoke spoken, spell spelt,
    spend spent, spill spilt, stand stood, steal stole stolen, stick stuck, sweep swept,
    swim swam swum, swing swung, take took taken, teach taught, tear tore torn, tell told,
    think thought, throw threw thrown, understand understood, wake woke woken, wear wore worn,
    weep wept, win won, write wrote written, child children, man men, woman women, foot feet,
    tooth teeth, mouse mice, goose geese, leaf leaves, wolf wolves, knife knives, life lives,
    wife wives, shelf shelves, thief thieves, good better best, bad worse worst""".split(','))}


@functools.lru_cache(maxsize=1 << 16)
def inflections(word):
    """The forms of `word` the rule accepts: -s (-es after s, x, z, ch, sh, o), -ed (-d after e),
    -ing (with a dropped final e or a doubled final consonant), -er/-est, -ly, y -> ies/ied/
    ier/iest/ily, and the irregular forms of IRREGULAR (ran for run, women for woman). (A frozenset,
    cached: the reward rule asks for the forms of every word of every answer.) Spelling rules
    without a dictionary: a few forms are other words (corn -> corner)."""
    w = word.lower()
    forms = {w, w + 's', w + 'ing', w + 'er', w + 'est', w + 'ly', w + 'd' if w.endswith('e') else w + 'ed',
             *IRREGULAR.get(w, ())}
    if w.endswith(('s', 'x', 'z', 'ch', 'sh', 'o')):
        forms.add(w + 'es')
    if w.endswith('e'):
        forms |= {w[:-1] + 'ing', w[:-1] + 'er', w[:-1] + 'est'}
    if len(w) >= 3 and w[-1] not in 'aeiouwy' and w[-2] in 'aeiou' and w[-3] not in 'aeiou':
        forms |= {w + w[-1] + 'ing', w + w[-1] + 'ed', w + w[-1] + 'er', w + w[-1] + 'est'}
    if w.endswith('y') and len(w) > 2:
        forms |= {w[:-1] + 'ies', w[:-1] + 'ied', w[:-1] + 'ier', w[:-1] + 'iest', w[:-1] + 'ily'}
    return frozenset(forms)


def uses(t, word):
    """Whether the text's (lower-case) word t uses `word`: t is one of word's inflections, or word
    is one of t's (the prompt may give 'jumped' and the story 'jump'); that second way only from
    words of 3 letters or more outside STOP_WORDS, whose made-up inflections would be other words
    (the -> thing, we -> wing, be -> best, for -> forest, should -> shoulder). A possessive uses its
    noun (king's uses king); other contractions are their own words (won't does not use win)."""
    w = word.lower()
    if t.endswith("'s") and uses(t[:-2], w):
        return True
    return t in inflections(w) or (len(t) >= 3 and t not in STOP_WORDS and w in inflections(t))


def word_used(word, text_words):
    """True if a whole word of the text uses `word` (see uses())."""
    return any(uses(t, word) for t in set(text_words))


def first_use(word, text_words):
    """Index of the first of text_words that uses `word` (len(text_words) if none does)."""
    return next((i for i, t in enumerate(text_words) if uses(t, word)), len(text_words))


def word_spans(text, words):
    """(start, end) character span in `text` of the first use of each of `words` (as word_used
    counts it: an inflection either way), in the order of `words`; None for a word not used."""
    matches = list(WORD.finditer(straight_quotes(text)))     # (the same positions as in text)
    tw = [m.group().lower() for m in matches]
    spans = []
    for w in words:
        i = first_use(w, tw)
        spans.append((matches[i].start(), matches[i].end()) if i < len(tw) else None)
    return spans


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


RULE_WEIGHTS = {'words': 0.6, 'features': 0.2, 'ending': 0.2}   # of score()'s parts, before the penalty
RULE_PARTS = (*RULE_WEIGHTS, 'repetition')                        # what score_parts() splits a score into
# how far apart the rule puts two answers (score gap; prepare/preferences.py keeps pairs at least its
# margin, 0.1, apart): a pair it barely separates (a repeated 4-gram, a feature) is a harder call than
# one that missing words decide (each of three is 0.2 of the score). name -> (its text, from, below)
GAP_BUCKETS = {'close': ('< 0.2', -math.inf, 0.2), 'middle': ('0.2-0.4', 0.2, 0.4), 'clear': ('>= 0.4', 0.4, math.inf)}


def gap_bucket(gap):
    """The GAP_BUCKETS name of a score gap (rounded first: the scores' float sums put a gap of one
    word, 0.4 - 0.2, at 0.19999999999999996), or None for an unknown (None or NaN) gap."""
    if gap is None or math.isnan(gap):
        return None
    return next(name for name, (_, lo, hi) in GAP_BUCKETS.items() if lo <= round(gap, 6) < hi)


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
    parts = {'words': words_frac, 'features': features_frac, 'ending': ending}
    total = sum(RULE_WEIGHTS[k] * v for k, v in parts.items()) * (1 - penalty)
    return {'score': total, 'words': words_frac, 'all_words': len(used) == len(words),
            'used': [w in used for w in words],          # per required word, in the prompt's order
            'features': features_frac, 'ending': ending, 'repetition': rep}


def score_parts(s):
    """What each part of the rule adds to a score() result: words, features and ending at their
    weights, and repetition, what the penalty took off (<= 0); they sum to s['score']."""
    parts = {k: w * float(s[k]) for k, w in RULE_WEIGHTS.items()}
    parts['repetition'] = s['score'] - sum(parts.values())
    return parts


WORDS_LEAD = 'uses the words: '     # what make_prompt writes before the list of required words


def prompt_word_spans(prompt, words):
    """(start, end) character span of each of `words` where the prompt lists it (make_prompt: after
    WORDS_LEAD, so that a required word such as 'story' is found in the list, not in 'Write a
    story'), in the order of `words`; None for a word not listed as written (all None for a prompt
    without that list)."""
    start = prompt.find(WORDS_LEAD)
    if start < 0:                                   # not a make_prompt prompt: no list to find them in
        return [None] * len(words)
    start += len(WORDS_LEAD)
    spans = []
    for w in words:
        m = re.compile(r'\b' + re.escape(w) + r'\b').search(prompt, start)
        spans.append(m.span() if m else None)
    return spans


def make_prompt(words, features=None):
    features = features or {}
    prompt = f"Write a story that {WORDS_LEAD}{', '.join(words)}."
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
    tokens = WORD.findall(straight_quotes(story))
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
    features only (dialogue); words [] where the record has no Words line (the records hold a
    random subset of the instruction kinds); None if it has no Story line."""
    fields, current = {}, None
    for line in doc.splitlines():
        m = re.match(r'^(Features|Words|Summary|Random sentence|Story):\s*(.*)$', line)
        if m:
            current = m.group(1)
            fields[current] = m.group(2)
        elif current:
            fields[current] += '\n' + line
    story, words = fields.get('Story', '').strip(), fields.get('Words', '').strip()
    if not story:
        return None
    features = {}
    if 'dialogue' in fields.get('Features', '').lower():
        features['dialogue'] = True
    return {'story': story, 'words': [w.strip() for w in words.split(',') if w.strip()],
            'features': features}


# -----------------------------------------------------------------------------
# Scoring a model on held-out prompts

def evaluate_task(model, tok, prompts, max_new_tokens=256, temperature=0.0, top_k=None,
                  batch_size=64, autocast=contextlib.nullcontext, seed=1337, cuda_graph=False,
                  frequency_penalty=0.0, presence_penalty=0.0):
    """Answer held-out prompts (dicts with 'prompt', 'words', 'features') and score the answers
    with the task rule: the means of score, words, ended and repetition, the share using all
    required words, the share using the i-th listed word (word_by_position, for i = 1, 2, ...:
    which of the words an answer drops), one example, and the per-prompt answers and scores."""
    raw = model._orig_mod if hasattr(model, '_orig_mod') else model
    device = next(raw.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    answers = generate_chat(raw, tok, [p['prompt'] for p in prompts], max_new_tokens, temperature,
                            top_k=top_k, batch_size=batch_size, autocast=autocast, generator=g,
                            cuda_graph=cuda_graph, frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty)
    scores = [score(a['text'], p['words'], p.get('features'), a['ended']) for a, p in zip(answers, prompts)]
    n = max(len(scores), 1)
    mean = lambda key: sum(float(s[key]) for s in scores) / n      # noqa: E731
    n_listed = max((len(s['used']) for s in scores), default=0)
    # share of answers using the i-th listed word, over the prompts that list at least i words
    by_position = [sum(s['used'][i] for s in scores if len(s['used']) > i) /
                   max(1, sum(len(s['used']) > i for s in scores)) for i in range(n_listed)]
    return {'score': mean('score'), 'all_words': mean('all_words'), 'words': mean('words'),
            'word_by_position': by_position,
            'ended': sum(a['ended'] for a in answers) / n, 'repetition': mean('repetition'),
            'example': {'prompt': prompts[0]['prompt'], 'answer': answers[0]['text']} if prompts else None,
            'answers': answers, 'scores': scores}


def rank_correlation(a, b):
    """Spearman's rank correlation of two sequences (ties get their average rank)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind='stable')
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):                          # average the ranks of ties
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float('nan')
    return float(np.corrcoef(ra, rb)[0, 1])


# -----------------------------------------------------------------------------
# One noun, one verb and one adjective from a story's own text, without a part-of-speech tagger
# (nltk's tagger data cannot be downloaded offline): make_task_pos looks the story's words up in
# the word lists below, written for this task: common concrete nouns, verbs (base forms) and
# adjectives of children's stories. The lists leave out the stop words, words whose usual part of
# speech in stories is unclear (rose, bear, kind, light, fish, rain, dress, ...) and near-function
# words (want, good, new); no word is in two lists. A listed word counts as present when the story
# has it, uncapitalised, in a regular form of its own part of speech (noun: plural; verb: -s, -ed,
# -ing; adjective: -er, -est) that `inflections` also accepts, so the reward rule always finds it.
# Irregular forms (ran, mice, better) are not matched. It is a heuristic: a word used in another
# part of speech than its list's ("a sudden jump") is still taken as that list's.

NOUNS = frozenset('''
dog cat bird horse cow pig sheep goat duck hen chicken rabbit bunny mouse fox wolf lion tiger
elephant monkey frog toad snake turtle owl eagle robin sparrow bee butterfly ant spider squirrel
deer puppy kitten pony donkey lamb calf whale dolphin shark crab snail worm dragon giant fairy
witch wizard king queen prince princess knight soldier sailor farmer baker teacher doctor mother
father sister brother baby girl boy woman grandmother grandfather aunt uncle cousin neighbor
neighbour servant shepherd hunter fisherman captain pirate goose parrot beetle mole
house cottage hut garden forest tree flower grass river lake sea ocean beach island mountain hill
valley field farm village town city castle palace tower bridge road path street school church
shop market kitchen door window wall roof floor bed table chair box basket bag cup plate bowl
spoon knife fork bottle jar candle lamp stove clock bell book letter pencil paper picture toy doll
ball kite boat ship wagon cart wheel carriage hat coat shoe boot glove scarf necklace crown sword
shield key coin treasure apple bread cake cookie pie cheese egg soup honey candy berry cherry
carrot potato corn nut seed branch root rock stone sand shell star moon sun sky cloud storm
rainbow feather nest cave pond fence gate barn meadow orchard blanket pillow mirror
umbrella ladder rope bucket broom pocket button ribbon flag drum trumpet violin piano guitar harp
flute song story game gift party picnic birthday lunch dinner breakfast supper bath chimney
fireplace cellar attic staircase hedge bush leaf petal daisy tulip lily acorn pumpkin strawberry
grape lemon pear plum peach banana sugar salt butter tea coffee jam tart pudding sandwich muffin
carpet curtain sofa cupboard drawer wardrobe cradle lantern torch map ticket purse jewel pearl
diamond crystal medal robot rocket airplane bicycle truck bus car balloon bubble puddle journey
adventure secret riddle lesson prize crumb pebble twig log kettle oven bench tent sled park zoo
library museum hospital station harbor harbour jungle tail wing paw claw beak fur horn nose ear
eye finger toe knee cheek chin lip mouth neck leg hair mud snowflake raindrop waterfall volcano
sunflower mushroom vine oak willow needle bead marble shovel spade sack barrel chest envelope
parcel package closet bedroom
'''.split())

VERBS = frozenset('''
jump laugh cry climb swim run hop skip clap shout whisper help open push pull kick carry hug
listen hide share bake eat sleep try hate pick build dig fix wash splash bounce chase follow
explore visit wander travel hurry knock sit stay wait grab lift pour fill spill shake tremble
shiver giggle sneeze yawn nod blink stare peep peek crawl tiptoe gallop fetch borrow scream yell
thank forgive remember forget learn teach count spell write sew knit decide agree obey scold
tease rescue pretend imagine arrive enjoy believe notice ask reply answer sniff lick chew swallow
nibble gobble tickle squeeze cuddle wiggle wriggle stretch scramble tumble stumble slip slide
skate paddle float drift flutter flap growl purr hiss chirp quack howl roar squeak sparkle
glitter shine twinkle melt freeze boil bloom grow gather collect hunt catch throw toss kneel
pray weep sob sigh frown grin chuckle gasp scratch rub sweep scrub polish fold bury feed keep
save worry wonder guess play walk smile dance watch love hope wish kiss touch drop call turn
start stop move pass rush return search promise sing swing bring hear finish
'''.split())

ADJECTIVES = frozenset('''
happy sad angry scared brave gentle quiet loud soft warm cold hot cool wet dry dark bright shiny
sunny cloudy rainy windy snowy sleepy hungry thirsty tired excited curious silly funny lucky busy
lazy proud shy polite rude clever wise foolish naughty greedy grumpy cheerful careful careless
helpful friendly lonely lovely pretty beautiful ugly tiny huge small tall short flat smooth
rough sharp dull heavy fresh sweet sour bitter salty yummy delicious tasty fluffy furry fuzzy
sticky smelly dirty muddy messy neat tidy empty full strong weak slow quick rich poor young
strange odd special wonderful terrible horrible awful fierce wild tame noisy calm gloomy cozy
merry jolly glad sorry red blue green yellow purple pink brown white black gray grey golden
wooden rusty ancient mighty royal colorful colourful playful joyful peaceful graceful thankful
hopeful fearful grateful honest humble eager nervous anxious jealous famous precious generous
delightful dreadful frightened surprised worried afraid alone asleep awake alive pale thin fat
deep fair sick broken magical clumsy cruel wicked handsome nice large pleasant silent bold fond
keen narrow broad thick steep distant sudden tender bare faint grim grand lively hearty weary
sorrowful mournful hasty ragged shabby plain rare ripe rotten savage stout slender stern swift
glorious splendid noble lame blind deaf dizzy drowsy dusty frosty frozen hollow icy misty mossy
rocky sandy shady silky starry stony stormy thorny woolly enormous gigantic immense vast puny
delicate elegant fancy ridiculous serious solemn severe strict harsh vain selfish faithful loyal
obedient diligent idle stupid smart ignorant innocent guilty evil holy magnificent gorgeous
charming comfortable miserable wretched unhappy dangerous safe useful useless valuable cheap
expensive costly gay handsome ugly crooked straight curly bald
'''.split())

LIST_WORDS = NOUNS | VERBS | ADJECTIVES   # every word a held-out prompt may ask for
POS_LISTS = {'verb': VERBS, 'noun': NOUNS, 'adjective': ADJECTIVES}   # prompt order, as in
                                                                         # TinyStories-Instruct


def _doubles(w):
    """Does `w` double its last letter before -ed / -ing / -er (hop: hopped, big: bigger)? A
    one-syllable word ending consonant-vowel-consonant does, and a few stressed-final ones."""
    if w in ('forget', 'regret', 'admit', 'permit', 'begin', 'prefer', 'occur', 'control', 'patrol'):
        return True                                          # stressed last syllable
    groups = re.findall(r'[aeiou]+', w)
    return (len(groups) == 1 and len(w) >= 3 and w[-1] not in 'aeiouwxy' and w[-2] in 'aeiou'
            and w[-3] not in 'aeiou')


def pos_forms(word, pos):
    """The regular forms of `word` as a noun (plural), verb (-s, -ed, -ing) or adjective (-er,
    -est), kept only where `inflections` accepts them too (so `score` finds them)."""
    w = word.lower()
    cons_y = w.endswith('y') and len(w) > 2 and w[-2] not in 'aeiou'
    s = w[:-1] + 'ies' if cons_y else w + 'es' if w.endswith(('s', 'x', 'z', 'ch', 'sh', 'o')) else w + 's'
    forms = {w}
    if pos in ('noun', 'verb'):
        forms.add(s)
    if pos == 'verb':
        stem = w + w[-1] if _doubles(w) else w[:-1] if w.endswith('e') and not w.endswith('ee') else w
        forms.add(w[:-1] + 'ied' if cons_y else w + 'd' if w.endswith('e') else stem + 'ed')
        forms.add(stem + 'ing')
    if pos == 'adjective':
        stem = w[:-1] + 'i' if cons_y else w + w[-1] if _doubles(w) else w[:-1] if w.endswith('e') else w
        forms |= {stem + 'er', stem + 'est'}
    return forms & inflections(w)


FORM_INDEX = {}                  # form -> [(base word, part of speech), ...]
for _pos, _words in POS_LISTS.items():
    for _w in sorted(_words - STOP_WORDS):
        for _f in pos_forms(_w, _pos):
            FORM_INDEX.setdefault(_f, []).append((_w, _pos))


SUFFIXES = {'noun': ('tion', 'sion', 'ness', 'ment', 'ship', 'hood', 'ity'),
            'adjective': ('ous', 'less', 'ful', 'able', 'ible')}   # no reliable one for verbs


def suffix_words(story, pos):
    """Words of the story (uncapitalised, 6+ letters, in no word list) whose ending marks them as
    nouns (-tion, -ness, -ment, ...) or adjectives (-ous, -less, -ful, -able, -ible): the second
    choice of make_task_pos. Sorted."""
    return sorted(t for t in content_words(story)
                  if len(t) >= 6 and t.endswith(SUFFIXES.get(pos, ())) and t not in LIST_WORDS)


def content_words(story):
    """make_task's candidates: words that occur uncapitalised, at least 3 letters, no stop words,
    no apostrophes (sorted)."""
    lower_seen = {t for t in WORD.findall(straight_quotes(story)) if t.islower()}
    return sorted(t for t in lower_seen if len(t) >= 3 and t not in STOP_WORDS and "'" not in t)


def make_task_pos(story, rng):
    """Required words and features for a plain story, TinyStories-Instruct style: one verb, one
    noun and one adjective of the story's own text (in that order), each chosen with `rng` among
    the listed words the story uses (POS_LISTS, pos_forms); for a part of speech the story uses
    none of, among its words with a noun or adjective ending (suffix_words), else among make_task's
    content words. Returns {'words', 'features', 'pos', 'how'}: 'how' says where each word came
    from ('list', 'suffix' or 'content'). None if the story has too few words."""
    found = {pos: set() for pos in POS_LISTS}
    for t in {t for t in WORD.findall(straight_quotes(story)) if t.islower()}:
        for base, pos in FORM_INDEX.get(t, ()):
            found[pos].add(base)
    words, how = [], []

    def pick(candidates):
        rng.shuffle(candidates)
        return next((c for c in candidates
                     if not any(word_used(c, [d]) or word_used(d, [c]) for d in words)), None)

    for pos in POS_LISTS:
        for kind, candidates in (('list', lambda: sorted(found[pos])),
                                 ('suffix', lambda: suffix_words(story, pos)),
                                 ('content', lambda: content_words(story))):
            w = pick(candidates())
            if w is not None:
                break
        if w is None:
            return None
        words.append(w)
        how.append(kind)
    return {'words': words, 'features': choose_features(story, rng), 'pos': list(POS_LISTS), 'how': how}
