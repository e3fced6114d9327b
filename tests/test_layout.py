"""The code's shape, read from the sources with ast (nothing imported): library modules import only library
modules, stages import no other stage, no import circle, no file past 600 lines, a top-level name means one
thing, and a stage's defaults read from its source are the ones it runs with."""
import ast
import glob
import importlib
import os
import sys

import pytest

import lumi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = {'lumi', 'checkpoint', 'training', 'engine', 'model', 'conversations', 'curves', 'stagefile', 'spm_proto',
           'kernels', 'sources', 'fetch', 'streams', 'clean', 'parts', 'datacard', 'bins'}
STAGES = {'data', 'train', 'sft', 'dpo', 'sample', 'eval', 'serve', 'export', 'pipeline', 'plot'}
MAX_LINES = 600
# names that mean the same kind of thing in every file that defines them: a stage's entry point
SAME_NAME_ALLOWED = {'main'}

def project_files():
    return sorted(glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'kernels', '*.py')))


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def top(name):
    return name.split('.')[0]


MODULES = {module_name(p): p for p in project_files()}
TOP_LEVEL = {top(m) for m in MODULES}


def imports(path, known):
    """Every module among `known` that a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative, inside kernels/
            names = ['kernels']
        else:
            continue
        found |= {top(n) for n in names if top(n) in known}
    return found


GRAPH = {top(m): set() for m in MODULES}
for _m, _p in MODULES.items():
    GRAPH[top(_m)] |= imports(_p, TOP_LEVEL) - {top(_m)}


def test_every_file_is_a_library_module_or_a_stage():
    assert TOP_LEVEL <= LIBRARY | STAGES, sorted(TOP_LEVEL - LIBRARY - STAGES)
    assert not LIBRARY & STAGES


def test_no_file_imports_a_stage():
    wrong = {(a, b) for a, deps in GRAPH.items() for b in deps if b in STAGES}
    assert not wrong, sorted(wrong)


def find_circle(graph):
    """One import circle of a {module: modules it imports} graph, as a path, or None."""
    state = {}

    def visit(node, path):
        if state.get(node) == 'open':
            return path[path.index(node):] + [node]
        if state.get(node) == 'done':
            return None
        state[node] = 'open'
        for dep in sorted(graph.get(node, ())):
            found = visit(dep, path + [node])
            if found:
                return found
        state[node] = 'done'
        return None
    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_no_import_circle():
    assert find_circle(GRAPH) is None, f"import circle: {' -> '.join(find_circle(GRAPH))}"


def test_the_checks_find_an_import_inside_a_function_and_a_circle(tmp_path):
    (tmp_path / 'a.py').write_text("def f():\n    import b\n")
    (tmp_path / 'b.py').write_text("from a import f\n")
    (tmp_path / 'c.py').write_text("import a\n")
    graph = {m: imports(str(tmp_path / f'{m}.py'), {'a', 'b', 'c'}) for m in 'abc'}
    assert graph == {'a': {'b'}, 'b': {'a'}, 'c': {'a'}}
    assert find_circle(graph) == ['a', 'b', 'a'] and find_circle({'c': {'a'}, 'a': set()}) is None


def line_count(path):
    with open(path) as f:
        return sum(1 for _ in f)


def test_no_file_is_longer_than_it_should_be():
    long = {os.path.relpath(p, ROOT): line_count(p) for p in project_files() if line_count(p) > MAX_LINES}
    assert not long, long


def test_a_top_level_name_is_defined_once_or_means_the_same():
    bodies = {}
    for path in project_files():
        for node in ast.parse(open(path).read(), path).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bodies.setdefault(node.name, {})[os.path.relpath(path, ROOT)] = ast.dump(node)
    twice = {name: sorted(where) for name, where in bodies.items()
             if len(set(where.values())) > 1 and name not in SAME_NAME_ALLOWED}
    assert not twice, f"one name, two meanings: {twice}"


# -----------------------------------------------------------------------------
# stage defaults read from the source (what the pipeline and config files go by) are the ones a stage runs with

DEFAULTS_OF = {'train': 'DEFAULTS', 'sft': 'DEFAULTS', 'dpo': 'DEFAULTS', 'eval': 'DEFAULTS', 'sample': 'DEFAULTS',
               'data': 'DEFAULTS', 'export': 'DEFAULTS', 'plot': 'DEFAULTS'}


@pytest.mark.parametrize('stage', sorted(DEFAULTS_OF))
def test_file_defaults_are_the_defaults_the_stage_imports_with(stage):
    module = importlib.import_module(stage)
    assert lumi.file_defaults(f'{stage}.py') == getattr(module, DEFAULTS_OF[stage])


def load_config_calls(path):
    tree = ast.parse(open(path).read(), path)
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'attr', getattr(n.func, 'id', ''))
            == 'load_config']


@pytest.mark.parametrize('stage', sorted(STAGES))
def test_every_stage_says_which_config_files_it_shares(stage):
    calls = load_config_calls(os.path.join(ROOT, f'{stage}.py'))
    assert calls and all(any(k.arg == 'shares_with' for k in c.keywords) for c in calls), stage


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
