import pytest

from prolora.errors import OptionError
from prolora.ops import ALL_OPS, Op, Problem, parse_overrides
from prolora.ops.registry import override_for


def make_op():
    op = Op("demo", "a test op")
    op.register("reference", reference=True)(lambda x: ("ref", x))
    op.register("fast", priority=10, check=lambda p: None if p.device == "cpu" else "cpu only")(lambda x: ("fast", x))
    op.register("gpu", priority=20, available=lambda: "no CUDA device")(lambda x: ("gpu", x))
    return op


def test_choose_prefers_priority_and_explains_rejections():
    op = make_op()
    c = op.choose(Problem())
    assert c.backend.name == "fast"
    assert c.rejected["gpu"] == "no CUDA device"
    assert "lower priority" in c.rejected["reference"]
    c = op.choose(Problem(device="meta"))
    assert c.backend.name == "reference" and c.rejected["fast"] == "cpu only"


def test_override():
    op = make_op()
    assert op.choose(Problem(), override="reference").backend.name == "reference"
    with pytest.raises(OptionError, match="no CUDA device"):
        op.choose(Problem(), override="gpu")
    with pytest.raises(OptionError, match="no backend 'nope'"):
        op.choose(Problem(), override="nope")


def test_parse_overrides():
    ov = parse_overrides("truncated_svd=reference, project_lora=torch")
    assert ov == {"truncated_svd": "reference", "project_lora": "torch"}
    op = make_op()
    assert override_for(op, parse_overrides("reference")) == "reference"
    assert override_for(op, parse_overrides("nonexistent")) is None
    assert parse_overrides(None) == {} and parse_overrides("") == {}


def test_every_op_has_exactly_one_reference():
    for op in ALL_OPS:
        assert sum(b.reference for b in op.backends.values()) == 1, op.name


def test_cuda_without_a_device_is_rejected_with_the_reason():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(OptionError, match="no CUDA device"):
        make_op().choose(Problem(device="cuda"))
