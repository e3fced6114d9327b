"""
What a Python file declares, read from its source without running it: the values of its top-level constant
assignments, and the comment that explains each. lumi.py reads a stage's defaults this way (a config file
shared with another stage, the pipeline's view of every stage) and writes --help from the comments beside
them, so no stage has to import another to know its keys.

Deliberately left out: anything computed at import time (a value that needs an import or a call is skipped).
"""
import ast
import tokenize


def constants(path):
    """The top-level assignments of a Python file whose values follow from literals and the assignments
    before them (`x = 1 << 20`, `url = _BASE + 'a.jsonl'`, `D = dict(a=1)`), evaluated without importing it."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    namespace = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                expr = compile(ast.Expression(node.value), path, 'eval')
                namespace[node.targets[0].id] = eval(expr, {'__builtins__': {'dict': dict}}, dict(namespace))
            except Exception:  # noqa: BLE001 - a value computed at import time is no plain default
                pass
    return namespace


def key_comments(*paths):
    """{key: the comment that explains it} for the defaults in these source files: the comment on the line of
    `key = value` (or `key=value,` inside a dict(...) of defaults), with the comment-only lines indented under
    it, else the comment block just above it. The first file that explains a key wins."""
    found = {}
    for path in paths:
        with open(path, 'rb') as f:
            source = f.read()
        comments, code_lines = {}, set()
        for t in tokenize.tokenize(iter(source.splitlines(keepends=True)).__next__):
            if t.type == tokenize.COMMENT:
                comments[t.start[0]] = (t.string.lstrip('#').strip(), t.start[1])
            elif t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                tokenize.ENCODING, tokenize.ENDMARKER):
                code_lines.update(range(t.start[0], t.end[0] + 1))
        targets = []  # (key, first line, last line)
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                targets.append((node.targets[0].id, node.lineno, node.end_lineno))
                if isinstance(node.value, ast.Call) and getattr(node.value.func, 'id', '') == 'dict':
                    targets += [(k.arg, k.value.lineno, k.value.end_lineno) for k in node.value.keywords if k.arg]

        def inline(line):
            return comments[line][0] if line in comments and line in code_lines else ''
        for key, first, last in targets:
            if key in found:
                continue
            text = next((inline(n) for n in range(first, last + 1) if inline(n)), '')
            if text:  # comment-only lines indented under it continue it
                n, col = last + 1, comments.get(last, comments.get(first, ('', 0)))[1]
                while n in comments and n not in code_lines and comments[n][1] >= col > 0:
                    text, n = f"{text} {comments[n][0]}", n + 1
            else:
                n, block = first - 1, []
                while n in comments and n not in code_lines and not comments[n][0].startswith('---'):
                    block.insert(0, comments[n][0])
                    n -= 1
                text = ' '.join(block)
            if text:
                found[key] = text
    return found

