import subprocess
import sys

import flowmodel


def test_version_and_show_versions(capsys):
    assert flowmodel.__version__.count(".") == 2
    text = flowmodel.show_versions()
    assert "pymc:" in text and "exactextract:" in text
    assert "flowmodel: " + flowmodel.__version__ in capsys.readouterr().out


def test_import_is_light():
    code = "import sys, flowmodel; flowmodel.build_dataset; print('pymc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flowmodel.nope  # noqa: B018
