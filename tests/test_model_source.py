"""Loading the user's model file: every convention of bnnslim.model_source, and every failure."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _helpers import SMALL_CNN
from torch import nn

from bnnslim.errors import BnnslimError
from bnnslim.model_source import file_sha256, load_model_source, split_spec

Write = Callable[..., Path]

HEADER = "from torch import nn\n"


def load(write_model: Write, body: str, spec_suffix: str = "", **kwargs) -> object:
    path = write_model(textwrap.dedent(HEADER) + textwrap.dedent(body).lstrip("\n"))
    return load_model_source(f"{path}{spec_suffix}", **kwargs)


def test_split_spec() -> None:
    assert split_spec("models/net.py:build") == (Path("models/net.py"), "build")
    assert split_spec("models/net.py") == (Path("models/net.py"), None)
    assert split_spec("net.py:") == (Path("net.py:"), None)  # not a name: the whole text is the path


def test_named_function(write_model: Write) -> None:
    src = load(write_model, """
        def make():
            return nn.Linear(2, 3)
        def build_model():
            return nn.Linear(2, 5)
    """, ":make")
    assert src.name == "make"
    assert src.build().out_features == 3  # the named one wins over build_model


def test_named_class(write_model: Write) -> None:
    src = load(write_model, """
        class A(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 3)
        class B(A):
            pass
    """, ":B")
    assert type(src.build()).__name__ == "B"


def test_named_instance_is_copied_on_every_build(write_model: Write) -> None:
    src = load(write_model, """
        net = nn.Linear(2, 3)
    """, ":net")
    a, b = src.build(), src.build()
    assert isinstance(a, nn.Linear) and a is not b
    assert torch.equal(a.weight, b.weight)  # copies of the user's instance, weights included


def test_named_attribute_that_is_not_a_model(write_model: Write) -> None:
    with pytest.raises(BnnslimError, match="'WIDTH' in net.py is a int, not a model or a function"):
        load(write_model, "WIDTH = 3\n", ":WIDTH")


def test_named_attribute_missing_lists_candidates(write_model: Write) -> None:
    with pytest.raises(BnnslimError, match="net.py has no 'Nett'.*candidates: Net"):
        load(write_model, """
            class Net(nn.Module):
                pass
        """, ":Nett")


def test_build_model_function(write_model: Write) -> None:
    src = load(write_model, """
        class Big(nn.Module):
            pass
        def build_model():
            return nn.Linear(2, 7)
    """)
    assert src.name == "build_model" and src.build().out_features == 7


def test_model_instance(write_model: Write) -> None:
    src = load(write_model, """
        class Net(nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.fc = nn.Linear(2, width)
        model = Net(width=9)
    """)
    assert src.name == "model" and src.build().fc.out_features == 9  # the instance, not Net()


def test_single_class_without_required_arguments(write_model: Write) -> None:
    src = load(write_model, """
        from torch.nn import Conv2d  # imported classes are not candidates

        class Block(nn.Module):
            def __init__(self, cin):  # needs an argument: not a candidate
                super().__init__()
                self.conv = Conv2d(cin, cin, 3)

        class Net(nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.block = Block(width)
    """)
    assert src.name == "Net" and isinstance(src.build().block.conv, nn.Conv2d)


def test_several_candidates_is_an_error_naming_them(write_model: Write) -> None:
    with pytest.raises(BnnslimError, match=r"several models in net.py: A, B\. choose one as net.py:NAME"):
        load(write_model, """
            class A(nn.Module):
                pass
            class B(nn.Module):
                pass
        """)


def test_no_candidate_is_an_error_with_the_convention(write_model: Write) -> None:
    with pytest.raises(BnnslimError, match=r"no model found in net.py\. define build_model\(\)"):
        load(write_model, """
            def helper(x):
                return x
        """)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BnnslimError, match="model file '.*nope.py' not found"):
        load_model_source(str(tmp_path / "nope.py"))


def test_syntax_error_shows_the_users_line(write_model: Write) -> None:
    with pytest.raises(BnnslimError) as err:
        load(write_model, """
            def build_model(:
                return nn.Linear(2, 3)
        """)
    msg = str(err.value)
    assert msg.startswith("syntax error in net.py line 2")
    assert "def build_model(:" in msg


def test_exception_at_import_shows_the_users_line(write_model: Write) -> None:
    with pytest.raises(BnnslimError) as err:
        load(write_model, """
            SIZE = 3
            layer = nn.Linear(SIZE, "four")
        """)
    msg = str(err.value)
    assert msg.startswith("importing net.py failed: TypeError")
    assert 'net.py line 3: layer = nn.Linear(SIZE, "four")' in msg


def test_missing_import_in_model_file(write_model: Write) -> None:
    with pytest.raises(BnnslimError, match="importing net.py failed: ModuleNotFoundError.*no_such_lib.*line 1"):
        load_model_source(str(write_model("import no_such_lib\n")))


def test_exception_while_building_shows_the_users_line(write_model: Write) -> None:
    src = load(write_model, """
        def build_model(num_classes=10):
            width = num_classes * 0
            return nn.Linear(4, 4 // width)
    """)
    with pytest.raises(BnnslimError) as err:
        src.build(num_classes=3)
    msg = str(err.value)
    assert "build_model(num_classes=3) failed: ZeroDivisionError" in msg
    assert "net.py line 4: return nn.Linear(4, 4 // width)" in msg


def test_factory_returning_something_else(write_model: Write) -> None:
    src = load(write_model, """
        def build_model():
            return "a model"
    """)
    with pytest.raises(BnnslimError, match="build_model in net.py returned str, not an nn.Module"):
        src.build()


def test_num_classes_and_in_channels_passed_only_when_accepted(write_model: Write) -> None:
    src = load(write_model, """
        calls = []
        def both(num_classes=10, in_channels=3):
            calls.append((num_classes, in_channels))
            return nn.Conv2d(in_channels, num_classes, 1)
        def classes_only(num_classes=10):
            return nn.Linear(2, num_classes)
        def neither():
            return nn.Linear(2, 2)
    """, ":both")
    m = src.build(num_classes=4, in_channels=1)
    assert (m.in_channels, m.out_channels) == (1, 4)
    assert src.build().out_channels == 10  # nothing offered: the defaults
    path = src.path
    assert load_model_source(f"{path}:classes_only").build(num_classes=4, in_channels=1).out_features == 4
    assert load_model_source(f"{path}:neither").build(num_classes=4, in_channels=1).out_features == 2


def test_class_factory_gets_num_classes(write_model: Write) -> None:
    src = load(write_model, """
        class Net(nn.Module):
            def __init__(self, num_classes=10):
                super().__init__()
                self.fc = nn.Linear(2, num_classes)
    """)
    assert src.build(num_classes=5, in_channels=1).fc.out_features == 5


def test_input_shape_from_the_file(write_model: Write) -> None:
    src = load(write_model, """
        INPUT_SHAPE = [3, 32, 32]
        def build_model():
            return nn.Identity()
    """)
    assert src.input_shape == (3, 32, 32)
    assert load(write_model, "model = nn.Identity()\n").input_shape is None


def test_bad_input_shape_in_the_file(write_model: Write) -> None:
    with pytest.raises(BnnslimError, match="INPUT_SHAPE in net.py must be a tuple of ints"):
        load(write_model, """
            INPUT_SHAPE = "3x32x32"
            model = nn.Identity()
        """)


def test_source_records_path_and_content_hash(write_model: Write) -> None:
    path = write_model(HEADER + "model = nn.Identity()\n")
    src = load_model_source(str(path))
    assert src.path == path.resolve() and src.path.is_absolute()
    assert src.sha256 == file_sha256(path) and len(src.sha256) == 64
    assert src.spec == f"{path.resolve()}:model"


def test_expected_hash_detects_a_changed_file(write_model: Write) -> None:
    path = write_model(HEADER + "model = nn.Identity()\n")
    digest = file_sha256(path)
    assert load_model_source(str(path), expected_sha256=digest).sha256 == digest
    path.write_text(path.read_text() + "# edited\n")
    with pytest.raises(BnnslimError, match="changed since the run directory was made"):
        load_model_source(str(path), expected_sha256=digest)


def test_model_file_can_import_its_neighbours(write_model: Write) -> None:
    write_model("from torch import nn\ndef block():\n    return nn.Linear(2, 6)\n", "helpers.py")
    path = write_model("from helpers import block\ndef build_model():\n    return block()\n", "main_net.py")
    assert load_model_source(str(path)).build().out_features == 6


def test_example_small_cnn_builds_for_the_bundled_data() -> None:
    src = load_model_source(str(SMALL_CNN))
    assert src.name == "build_model" and src.input_shape == (1, 28, 28)
    model = src.build(num_classes=10, in_channels=1)
    assert model(torch.randn(2, *src.input_shape)).shape == (2, 10)
