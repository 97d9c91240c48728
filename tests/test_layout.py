"""The package's stage layout: each subpackage says what it owns, and the modules' old flat names
(before the subpackages) still import, forwarding to the new homes with a DeprecationWarning."""

import importlib
import pkgutil
import subprocess
import sys
import warnings

import pytest

import llamaexport
from llamaexport import _moved

STAGES = ("model", "artifact", "tensorrt", "build", "runtime", "serving", "verify")


def test_the_package_is_cut_by_stage():
    """Every module lives in a stage subpackage (cli and the package's own small modules aside), and
    each subpackage's docstring says what it owns and what it may import."""
    top = {m.name for m in pkgutil.iter_modules(llamaexport.__path__)}
    assert top == {*STAGES, "cli", "_moved"}, top
    for stage in STAGES:
        doc = importlib.import_module(f"llamaexport.{stage}").__doc__ or ""
        assert "import" in doc.lower() and len(doc.split()) > 20, f"llamaexport.{stage} does not say what it may import"


def test_old_module_names_forward_to_the_new_homes():
    """In a fresh interpreter, where no old name was imported yet: each old name warns once, naming its
    new home, and hands out the new module's very objects."""
    code = """if True:
        import importlib, sys, warnings
        from llamaexport._moved import MOVED
        for old, new in MOVED.items():
            new = importlib.import_module("llamaexport." + new)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mod = importlib.import_module("llamaexport." + old)
            assert [str(w.message) for w in caught] == [f"llamaexport.{old} is now {new.__name__}; import it from there"], caught
            names = [n for n in dir(new) if not n.startswith("__")]
            assert names and all(getattr(mod, n) is getattr(new, n) for n in names), old
        print(len(MOVED))
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == str(len(_moved.MOVED)), r.stderr + r.stdout


def test_the_readme_imports_work():
    from llamaexport.build import build
    from llamaexport.runtime import Engine, LlamaModel, SamplingConfig
    from llamaexport.verify import check

    assert callable(build) and callable(check) and LlamaModel.load and Engine.stream and SamplingConfig()


def test_an_unknown_name_is_still_an_import_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("llamaexport.no_such_module")
        with pytest.raises(AttributeError):
            importlib.import_module("llamaexport.sampling").no_such_name  # noqa: B018
