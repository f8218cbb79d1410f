import pytest
import tiktoken

from conftest import TEXT, shared_file
from tokenizer import (EOT, BPETokenizer, ByteTokenizer, CharTokenizer, WordTokenizer, build_tokenizer,
                       gpt2_tokenizer, ranks_from_bytes, ranks_to_bytes, tokenizer_from_spec, train_bpe,
                       with_chat_tokens)

SAMPLE = 'Once upon a time, Lily said: "Look — a café!"\nThe end. 42 ducks, don\'t worry 😀'


def round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    again = tokenizer_from_spec(tok.spec())          # the spec rebuilds an identical tokenizer
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size
    return ids


def test_byte_round_trip():
    tok = ByteTokenizer()
    ids = round_trip(tok, SAMPLE)
    assert tok.decode(ids) == SAMPLE and len(ids) == len(SAMPLE.encode())
    assert (tok.vocab_size, tok.eot_id) == (257, 256)


def test_char_round_trip_and_unknown_character():
    tok = CharTokenizer.train([SAMPLE])
    assert tok.decode(round_trip(tok, SAMPLE)) == SAMPLE
    assert tok.eot_id == len(set(SAMPLE)) and tok.vocab_size == tok.eot_id + 1
    with pytest.raises(ValueError, match="'Z'"):
        tok.encode('Zoo')


def test_word_round_trip():
    tok = WordTokenizer.train([TEXT, SAMPLE], vocab_size=200)
    ids = round_trip(tok, SAMPLE)
    assert tok.encode(tok.decode(ids)) == ids           # the lossy tokenizer's round trip
    normal = 'once upon a time, lily said: "look, a café!" the end.'
    assert tok.decode(tok.encode(normal)) == normal     # text already in normal form survives
    small = WordTokenizer.train([TEXT], vocab_size=5)   # 3 words + <unk> + EOT
    assert small.vocab_size == 5 and small.encode('zebra') == [0]
    assert small.decode(small.encode('zebra')) == '<unk>'
    assert small.encode(small.decode([0, 1, 0])) == [0, 1, 0]
    wiki = WordTokenizer.train(['the <unk> sat on the <unk> <unk> .'], vocab_size=10)   # WikiText writes <unk>
    assert wiki.words.count('<unk>') == 1 and wiki.encode('<unk> zebra') == [0, 0]


def test_special_ids_decode_to_their_names_and_bad_ids_fail():
    tok = ByteTokenizer()
    assert tok.decode([72, 105, tok.eot_id]) == 'Hi' + EOT
    with pytest.raises(ValueError, match='outside'):
        tok.decode([999])


def test_gpt2_from_local_rank_file_matches_reference_ids():
    tok = gpt2_tokenizer(shared_file('gpt2.tiktoken'))
    assert tok.encode('Hello world') == [15496, 995]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.decode(round_trip(tok, SAMPLE)) == SAMPLE
    assert tok.encode(EOT) != [tok.eot_id]               # plain text is never special
    assert tok.decode([tok.eot_id]) == EOT
    assert tokenizer_from_spec(tok.spec()).kind == 'gpt2'


def test_gpt2_missing_file_is_a_clear_error():
    with pytest.raises(ValueError, match='no/such/file'):
        gpt2_tokenizer('no/such/file')


def test_bpe_training_follows_the_textbook_merges():
    # 'aaabdaaabac' (the Wikipedia example): 'aa' is most frequent, then 'ab' (tied with 'aa'+'a'...
    # broken toward the smallest ids), then 'aa'+'ab'.
    ranks = train_bpe(['aaabdaaabac'], vocab_size=260, verbose=False)
    merged = sorted((r, t) for t, r in ranks.items() if r >= 256)
    assert [t for _, t in merged] == [b'aa', b'ab', b'aaab']
    assert all(ranks[bytes([i])] == i for i in range(256))


def test_bpe_is_tiktoken_compatible_and_compresses():
    docs = [TEXT[i:i + 500] for i in range(0, len(TEXT), 500)]
    tok = build_tokenizer('bpe', texts=docs, vocab_size=300)
    assert isinstance(tok.enc, tiktoken.Encoding) and tok.vocab_size == 300 and tok.eot_id == 299
    ids = round_trip(tok, SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert len(tok.encode(TEXT)) < 0.7 * len(TEXT.encode())      # 43 merges: 9,200 bytes -> 5,400 ids
    blob = ranks_to_bytes(ranks_from_bytes(tok.spec()['ranks']))
    assert blob == tok.spec()['ranks']                           # tiktoken's rank-file format


def test_bpe_small_vocab_is_rejected():
    with pytest.raises(ValueError, match='at least 257'):
        train_bpe(['abc'], vocab_size=100)


def test_unknown_kind():
    with pytest.raises(ValueError, match='valid: gpt2, bpe, byte, char, word'):
        build_tokenizer('sentencepiece')
    with pytest.raises(ValueError, match='unknown tokenizer kind'):
        tokenizer_from_spec({'kind': 'nope'})


def test_bpe_tokenizer_rejects_out_of_range_ids():
    tok = build_tokenizer('bpe', texts=['hello hello world'], vocab_size=260)
    with pytest.raises(ValueError, match='outside'):
        tok.decode([5000])
    with pytest.raises(ValueError, match='token id 5000 is outside'):     # as serve.py's streams decode
        tok.decode_bytes([5000])
    assert isinstance(tok, BPETokenizer)


def test_a_file_that_is_no_rank_file_is_named(tmp_path):
    """A Hugging Face vocab.json or merges.txt given as tokenizer_file: the file and the format
    are named, not 'not enough values to unpack'."""
    for name, text in (('vocab.json', '{"a": 1, "b": 2}\n'), ('merges.txt', '#version: 0.2\nh e\n')):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"tokenizer_file='.*{name}': not a tiktoken rank file "
                                             f"\\(line 1: .*'base64\\(token\\) rank'"):
            gpt2_tokenizer(str(tmp_path / name))


def test_a_system_message_leads_the_first_user_turn_wherever_it_stands():
    """Also when the conversation opens with an assistant turn (a greeting): the system text was
    dropped there."""
    tok = with_chat_tokens(ByteTokenizer())
    turns = [{'role': 'system', 'content': 'Be nice.'}, {'role': 'assistant', 'content': 'Hi!'},
             {'role': 'user', 'content': 'Hello.'}, {'role': 'assistant', 'content': 'Yes?'},
             {'role': 'user', 'content': 'Bye.'}]
    assert tok.decode(tok.encode_messages(turns)) == ('<|endoftext|><|assistant|>Hi!<|end|><|user|>Be nice.\n\nHello.'
                                                      '<|end|><|assistant|>Yes?<|end|><|user|>Bye.<|end|><|assistant|>')
