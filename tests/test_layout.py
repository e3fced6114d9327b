"""The code's shape, read from the sources with ast (nothing imported): at most 20 Python files at the root,
each named in README.md's tables; library modules import only library modules, stages import no other stage,
no import circle (between the data library's layers too), no file imports another's _private name, no file
past 600 lines or line past 110 columns, a top-level name means one thing; every stage declares its keys one
way; the tokenizer and LoRA each live in a file of their own."""
import ast
import glob
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = {'lumi', 'tokenizer', 'lora', 'checkpoint', 'optim', 'training', 'engine', 'model', 'curves',
           'httpd', 'kernels', 'corpus', 'corpus.fetch', 'corpus.streams', 'corpus.records', 'corpus.sources',
           'corpus.conversations', 'corpus.tasks', 'corpus.clean', 'corpus.bins', 'corpus.parts',
           'corpus.card', 'formats'}
STAGES = {'data', 'train', 'sft', 'dpo', 'sample', 'eval', 'serve', 'export', 'pipeline'}
MAX_LINES = 600
MAX_COLUMNS = 110
MAX_ROOT_FILES = 20
# names that mean the same kind of thing in every file that defines them: a stage's entry point
SAME_NAME_ALLOWED = {'main'}
# packages whose modules are nodes of the import graph of their own (PACKAGE.X, not PACKAGE): the data
# library's layers, so that a layer calling back up into one above it is an import circle
LAYERED = {'corpus'}


def project_files():
    return sorted(glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'kernels', '*.py'))
                  + glob.glob(os.path.join(ROOT, 'corpus', '*.py')))


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def node_of(name):
    """A module's node in the import graph: its top-level name, or PACKAGE.X inside a LAYERED package."""
    parts = name.split('.')
    return '.'.join(parts[:2]) if parts[0] in LAYERED else parts[0]


MODULES = {module_name(p): p for p in project_files()}
NODES = {node_of(m) for m in MODULES}


def imports(path, known):
    """Every module among `known` that a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from corpus import sources`
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        elif isinstance(node, ast.ImportFrom):  # relative, inside kernels/
            names = ['kernels']
        else:
            continue
        found |= {node_of(n) for n in names if node_of(n) in known}
    return found


GRAPH = {node_of(m): set() for m in MODULES}
for _m, _p in MODULES.items():
    GRAPH[node_of(_m)] |= imports(_p, NODES) - {node_of(_m)}


def test_every_file_is_a_library_module_or_a_stage():
    assert NODES <= LIBRARY | STAGES, sorted(NODES - LIBRARY - STAGES)
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


def test_a_layer_of_the_data_library_is_a_node_of_its_own(tmp_path):
    (tmp_path / 'a.py').write_text("from corpus import sources\nfrom corpus.streams import Stream\n"
                                   "import lumi\n")
    assert imports(str(tmp_path / 'a.py'), NODES) == {'corpus', 'corpus.sources', 'corpus.streams', 'lumi'}


def private_imports(path, local):
    """(module, name) for each _private name a file imports from a module among
    `local` (or a relative one)."""
    found = []
    for n in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(n, ast.ImportFrom) and (n.level or n.module in local):
            found += [(n.module or '.', a.name) for a in n.names
                      if a.name.startswith('_') and not a.name.endswith('__')]
    return found


def test_no_file_imports_a_private_name_from_another():
    # a name used across files is public, so a file's _helpers can change without reading every other file
    others = [p for d in ('tests', 'benchmarks', 'configs', os.path.join('configs', 'sources'))
              for p in glob.glob(os.path.join(ROOT, d, '*.py'))]
    local = set(MODULES) | {os.path.basename(p)[:-3] for p in others}
    wrong = {os.path.relpath(p, ROOT): found for p in project_files() + others
             if (found := private_imports(p, local))}
    assert not wrong, wrong


def test_the_private_import_check_finds_one(tmp_path):
    (tmp_path / 'a.py').write_text("from corpus.streams import Stream, _budget\nfrom os import _exit\n")
    assert private_imports(str(tmp_path / 'a.py'), {'corpus.streams'}) == [('corpus.streams', '_budget')]


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


def test_the_root_holds_few_python_files_and_readme_names_each():
    root = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, '*.py')))
    assert len(root) <= MAX_ROOT_FILES, root
    readme = open(os.path.join(ROOT, 'README.md')).read()
    named = root + [f"corpus/{os.path.basename(p)}" for p in glob.glob(os.path.join(ROOT, 'corpus', '*.py'))
                    if not p.endswith('__init__.py')]
    missing = [n for n in named if f'`{n}`' not in readme and f'`{os.path.basename(n)}`' not in readme]
    assert not missing, f"README.md's tables do not name {missing}"


def test_no_line_is_wider_than_it_should_be():
    others = [p for d in ('tests', 'benchmarks', 'configs', os.path.join('configs', 'sources'))
              for p in glob.glob(os.path.join(ROOT, d, '*.py'))]
    wide = {}
    for path in project_files() + others:
        with open(path) as f:
            lines = [n for n, line in enumerate(f, 1) if len(line.rstrip('\n')) > MAX_COLUMNS]
        if lines:
            wide[os.path.relpath(path, ROOT)] = lines[:5]
    assert not wide, wide


def top_level_names(path):
    return {t.id for n in ast.parse(open(path).read(), path).body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name)}


@pytest.mark.parametrize('stage', sorted(STAGES))
def test_every_stage_declares_its_keys_one_way(stage):
    # keys are commented module constants (lumi.declared_keys reads them, ranges and all); no dict of defaults
    path = os.path.join(ROOT, f'{stage}.py')
    assert 'KEYS = lumi.declared_keys(__file__)' in open(path).read(), stage
    for module in project_files():
        assert not {n for n in top_level_names(module)
                    if n in ('DEFAULTS', 'OPTIONS') or n.endswith('_DEFAULTS')}, module


def defined_in(name):
    return sorted(os.path.relpath(p, ROOT) for p in project_files()
                  for n in ast.parse(open(p).read(), p).body
                  if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)


def test_the_tokenizer_and_lora_each_live_in_one_file():
    for name in ('Tokenizer', 'render_chat', 'tokenizer_identity', 'markers_as_control'):
        assert defined_in(name) == ['tokenizer.py'], name
    for name in ('LoRALinear', 'TokenRows', 'apply_lora', 'merge_lora', 'adapter_state', 'check_adapter',
                 'apply_adapter'):
        assert defined_in(name) == ['lora.py'], name


def load_config_calls(path):
    tree = ast.parse(open(path).read(), path)
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, 'attr', getattr(n.func, 'id', '')) == 'load_config']


@pytest.mark.parametrize('stage', sorted(STAGES))
def test_every_stage_says_which_config_files_it_shares(stage):
    calls = load_config_calls(os.path.join(ROOT, f'{stage}.py'))
    assert calls and all(any(k.arg == 'shares_with' for k in c.keywords) for c in calls), stage


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
