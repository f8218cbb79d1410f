"""The instruction task's reward rule (task.py), on hand-written stories."""

import random

import pytest

from task import (inflections, make_prompt, make_task, parse_instruct, repetition, score, sentences,
                  word_spans, word_used, words_of)

GOOD = ('Once upon a time, a little fox found a shiny key in the grass. "What does it open?" she '
        'asked her friend the owl. The owl smiled and said, "Let us find out!" They walked to the old '
        'tree and opened a tiny door. Inside was a warm, happy home. The fox was very happy.')


def test_a_good_story_scores_one():
    s = score(GOOD, ['fox', 'shiny', 'open'], {'dialogue': True, 'max_sentences': 10}, ended=True)
    assert s == {'score': 1.0, 'words': 1.0, 'all_words': True, 'used': [True, True, True], 'features': 1.0,
                 'ending': 1.0, 'repetition': pytest.approx(s['repetition'])}
    assert s['repetition'] < 0.05


def test_missing_words_count_as_a_share():
    s = score(GOOD, ['fox', 'dragon', 'castle'], ended=True)
    assert s['words'] == pytest.approx(1 / 3) and not s['all_words'] and s['used'] == [True, False, False]
    assert s['score'] == pytest.approx(0.6 / 3 + 0.2 + 0.2)


def test_words_are_whole_words_in_any_listed_inflection():
    text = words_of('The kids were jumping. She cried. He made the happiest cake and was running.')
    assert word_used('jump', text) and word_used('cry', text) and word_used('happy', text)
    assert word_used('run', text) and word_used('make', text)           # 'made': irregular (task.IRREGULAR)
    assert word_used('jumped', words_of('They jump.'))                     # prompt form inflected, text base
    assert not word_used('cat', words_of('The category was cathartic.'))   # whole words only
    for word, text in (('thing', 'The cat sat.'), ('wing', 'We ran.'), ('best', 'Be brave.'), ('seed', 'I see.'),
                       ('forest', 'One for all.'), ('shoulder', 'You should.'), ('shed', 'She hid.')):
        assert not word_used(word, words_of(text)), (word, text)     # a stop word's made-up forms
    assert word_used('running', words_of('I run.')) and word_used('baked', words_of('We bake.'))
    assert 'bakeed' not in inflections('bake') and 'dogs' in inflections('dog') and 'boxes' in inflections('box')
    assert {'dogs', 'dogged', 'dogging'} <= inflections('dog')
    # irregular forms count: a story that says the fox ran, the women, kept the key uses run, woman, keep
    assert {'ran', 'running'} <= inflections('run') and 'women' in inflections('woman') and 'kept' in inflections('keep')
    assert score('The fox ran to the women and kept the key.', ['run', 'woman', 'keep'])['words'] == 1.0
    assert 'ran' not in inflections('rain')
    assert {'making', 'bakes'} <= inflections('make') | inflections('bake')
    # a possessive uses its noun; other contractions are words of their own
    assert score("The king's crown shone. Her mothers' hats.", ['king', 'mother'])['words'] == 1.0
    assert not word_used('win', words_of("I won't go.")) and not word_used('kingdom', words_of("The king's."))
    # ... also with the typographic apostrophe, which books and TinyStories use: won’t was won + t
    assert score('I won’t go.', ['win'])['words'] == 0.0 and score('The king’s crown.', ['king'])['words'] == 1.0
    assert word_spans('Tom won’t see the king’s fox.', ['king', 'fox']) == [(18, 24), (25, 28)]


def test_features():
    no_dialogue = 'The cat sat. The cat slept.'
    assert score(no_dialogue, ['cat'], {'dialogue': True})['features'] == 0.0
    assert score('Tom said, "Hi!" Then he left.', ['tom'], {'dialogue': True})['features'] == 1.0
    long = ' '.join(f'Sentence number {i} is here.' for i in range(12))
    assert len(sentences(long)) == 12
    assert score(long, ['sentence'], {'max_sentences': 10})['features'] == 0.0
    assert score(long, ['sentence'], {'max_sentences': 15, 'dialogue': True})['features'] == 0.5


def test_ending_needs_the_end_of_turn_and_a_finished_sentence():
    assert score(GOOD, ['fox'], ended=False)['ending'] == 0.0
    assert score('The fox ran to the', ['fox'], ended=True)['ending'] == 0.0
    assert score('The fox said, "Bye!"', ['fox'], ended=True)['ending'] == 1.0


def test_degenerate_repetition_is_penalised():
    loop = 'The fox ran and the fox ran and ' * 20 + 'the end.'
    assert repetition(loop) > 0.8
    assert score(loop, ['fox'], ended=True)['score'] == 0.0
    assert repetition(GOOD) < 0.2


def test_prompt_and_task_making():
    assert make_prompt(['fox', 'key'], {'dialogue': True, 'max_sentences': 10}) == \
        'Write a story that uses the words: fox, key. The story should have dialogue. Use at most 10 sentences.'
    t = make_task(GOOD, random.Random(0))
    assert len(t['words']) == 3 and all(w.islower() and len(w) >= 3 for w in t['words'])
    assert score(GOOD, t['words'], t['features'])['score'] == 1.0        # the story solves its task
    assert make_task('A cat.', random.Random(0)) is None


def test_parse_instruct():
    doc = ('Features: Dialogue, BadEnding\nWords: quit, oak, gloomy\nSummary: A tree.\n'
           'Story: \nThe oak was gloomy.\n"I quit," it said.')
    assert parse_instruct(doc) == {'story': 'The oak was gloomy.\n"I quit," it said.',
                                   'words': ['quit', 'oak', 'gloomy'], 'features': {'dialogue': True}}
    assert parse_instruct('Just a plain story.') is None
    # a record with a Summary and a Story but no Words line: its story, without the header lines
    assert parse_instruct('Summary: A tree.\nStory: \nThe oak was gloomy.') == {
        'story': 'The oak was gloomy.', 'words': [], 'features': {}}
    # the Hugging Face hub serves TinyStoriesInstruct line by line: rows grouped back into records
    from data import records_of_lines
    rows = doc.split('\n') + ['<|endoftext|>'] + ['Words: sun', 'Story: ', 'It was hot.'] + ['<|endoftext|>']
    records = records_of_lines(rows)
    assert records[0] == doc and parse_instruct(records[1])['words'] == ['sun'] and len(records) == 2
    assert records_of_lines(['One story.', 'Another.']) == ['One story.', 'Another.']   # rows already records


def test_evaluate_task_says_which_listed_word_the_answers_drop(monkeypatch):
    """word_by_position: the share of answers using the 1st, 2nd, 3rd listed word (here the third
    word is dropped by two answers of three, the second by one)."""
    import torch

    import task
    answers = ['The fox found a key in a box.', 'The fox found a key.', 'The fox sat.']
    monkeypatch.setattr(task, 'generate_chat', lambda *a, **k: [{'text': t, 'ended': True} for t in answers])
    prompts = [{'prompt': make_prompt(['fox', 'key', 'box']), 'words': ['fox', 'key', 'box']}] * 3
    r = task.evaluate_task(torch.nn.Linear(1, 1), None, prompts)
    assert r['word_by_position'] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert r['all_words'] == pytest.approx(1 / 3) and r['words'] == pytest.approx((3 + 2 + 1) / 9)
