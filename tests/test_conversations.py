"""corpus/conversations.py: preference records in each format as (prompt messages, chosen, rejected), chat
records refused with the field named, and bad records skipped and counted. (Every chat format rendered through
the template, with its mask, is tests/test_sft.py's.)"""
import json
from collections import Counter

import pytest

from corpus import conversations
from test_sft import ALPACA, format_files  # noqa: F401  (a fixture)

# -----------------------------------------------------------------------------
# chat records


def test_oasst_skips_unanswered_trees_and_counts_them(format_files):
    stats = Counter()
    assert len(list(conversations.load_conversations(format_files['oasst'], stats=stats))) == 1
    assert stats['skipped'] == 1 and stats['skipped: no assistant reply'] == 1
    assert stats['oasst deleted messages'] == 1


def test_bad_records_raise_clear_errors_and_are_skipped_and_counted(tmp_path):
    with pytest.raises(ValueError, match="field 'output' is missing"):
        conversations.to_messages({'instruction': 'x', 'input': ''})
    with pytest.raises(ValueError, match=r"conversations\[1\].from': unsupported role 'function_call'"):
        conversations.to_messages({'conversations': [{'from': 'human', 'value': 'a'},
                                                     {'from': 'function_call', 'value': 'b'}]})
    with pytest.raises(ValueError, match='image content is not supported'):
        conversations.to_messages({'messages': [{'role': 'user',
                                                 'content': [{'type': 'image', 'image': 'x.png'}]},
                                                {'role': 'assistant', 'content': 'a'}]})
    with pytest.raises(ValueError, match='unknown record format'):
        conversations.to_messages({'question': 'q', 'answer': 'a'})
    path = tmp_path / 'mixed.jsonl'
    path.write_text('\n'.join([json.dumps(ALPACA[0]), json.dumps({'instruction': 'no output'}), '{not json',
                               json.dumps({'instruction': 'i', 'output': '   '}),
                               json.dumps(ALPACA[1])]) + '\n')
    stats = Counter()
    with pytest.warns(UserWarning, match='malformed JSON line'):
        convs = list(conversations.load_conversations(str(path), stats=stats))
    assert len(convs) == 2 and stats['skipped'] == 2 and stats['malformed_lines'] == 1
    assert stats["skipped: field 'output' is missing"] == 1 and stats['skipped: empty assistant message'] == 1


# -----------------------------------------------------------------------------
# preference pairs


def test_hh_rlhf_splits_the_shared_prompt():
    rec = {'chosen': '\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4.',
           'rejected': '\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\n'
                       'Assistant: It is five.'}
    prompt, chosen, rejected = conversations.to_pair(rec)
    assert prompt == [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'},
                      {'role': 'user', 'content': 'What is 2+2?'}]
    assert (chosen, rejected) == ('It is 4.', 'It is five.')


def test_orca_ultrafeedback_llamafactory():
    orca = {'system': 'You are helpful.', 'question': 'Name a colour.', 'chosen': 'Blue.', 'rejected': 'No.'}
    assert conversations.to_pair(orca) == ([{'role': 'system', 'content': 'You are helpful.'},
                                  {'role': 'user', 'content': 'Name a colour.'}], 'Blue.', 'No.')
    assert conversations.to_pair(dict(orca, system=''))[0] == [{'role': 'user', 'content': 'Name a colour.'}]
    uf = {'prompt': 'Say hi', 'prompt_id': 'x', 'score_chosen': 8.0, 'score_rejected': 3.0,
          'chosen': [{'role': 'user', 'content': 'Say hi'}, {'role': 'assistant', 'content': 'Hi!'}],
          'rejected': [{'role': 'user', 'content': 'Say hi'}, {'role': 'assistant', 'content': 'Bye.'}]}
    assert conversations.to_pair(uf) == ([{'role': 'user', 'content': 'Say hi'}], 'Hi!', 'Bye.')
    # TRL's conversational shape: the reply alone
    trl = {'prompt': [{'role': 'user', 'content': 'Say hi'}],
           'chosen': [{'role': 'assistant', 'content': 'Hi!'}],
           'rejected': [{'role': 'assistant', 'content': 'Bye.'}]}
    assert conversations.to_pair(trl) == conversations.to_pair(uf)
    lf = {'conversations': [{'from': 'system', 'value': 'Be kind.'}, {'from': 'human', 'value': 'Hello?'}],
          'chosen': {'from': 'gpt', 'value': 'Hello, friend.'},
          'rejected': {'from': 'gpt', 'value': 'Go away.'}}
    assert conversations.to_pair(lf) == ([{'role': 'system', 'content': 'Be kind.'},
                                          {'role': 'user', 'content': 'Hello?'}],
                                         'Hello, friend.', 'Go away.')


@pytest.mark.parametrize('record, field', [
    ({'question': 'q', 'chosen': 'a'}, "'rejected'"),
    ({'conversations': [{'from': 'alien', 'value': 'x'}], 'chosen': {'from': 'gpt', 'value': 'a'},
      'rejected': {'from': 'gpt', 'value': 'b'}}, 'conversations[0].from'),
    ({'conversations': [{'from': 'human', 'value': 'x'}], 'chosen': {'from': 'human', 'value': 'a'},
      'rejected': {'from': 'gpt', 'value': 'b'}}, 'chosen'),
    ({'question': 'q', 'chosen': 'same', 'rejected': 'same'}, 'same reply'),
    ({'prompt': 'Hi', 'chosen': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'a'}],
      'rejected': [{'role': 'user', 'content': 'Bye'}, {'role': 'assistant', 'content': 'b'}]},
     'differ before'),
    ({'chosen': 'Human: no markers', 'rejected': 'Human: no markers either'}, 'Assistant'),
    ({'text': 'not a pair'}, 'unknown preference format'),
])
def test_bad_records_name_the_field(record, field):
    with pytest.raises(ValueError, match=field.replace('[', r'\[').replace(']', r'\]')):
        conversations.to_pair(record)


def test_load_pairs_skips_and_counts_bad_records(tmp_path):
    path = tmp_path / 'pairs.jsonl'
    good = {'question': 'Name a colour.', 'chosen': 'Blue.', 'rejected': 'No.'}
    path.write_text('\n'.join([json.dumps(good), json.dumps({'question': 'q', 'chosen': 'a'}), '{broken',
                               json.dumps(dict(good, chosen='Red.'))]) + '\n')
    stats = Counter()
    with pytest.warns(UserWarning, match='malformed'):
        pairs = conversations.load_pairs(str(path), 'auto', stats)
    assert [p[1] for p in pairs] == ['Blue.', 'Red.']
    assert stats['bad_pairs'] == 1 and stats['malformed_lines'] == 1

