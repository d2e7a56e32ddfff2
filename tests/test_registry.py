"""Tests for petra.registry: decorator registration, duplicates, unknown names, ordering."""

import pytest

from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS, Entry, Registry


@pytest.fixture
def widgets():
    registry = Registry("widget")

    @registry.register("zeta", description="the last letter", speed=3)
    def zeta(x):
        return x + 1

    @registry.register("alpha", description="the first letter")
    def alpha(x):
        return x * 2

    registry.register("mu", description="a middle letter")(lambda x: -x)
    return registry


def test_names_and_describe_keep_registration_order(widgets):
    assert widgets.names() == ["zeta", "alpha", "mu"]
    assert list(widgets.describe().items()) == [
        ("zeta", "the last letter"),
        ("alpha", "the first letter"),
        ("mu", "a middle letter"),
    ]
    assert [entry.name for entry in widgets] == ["zeta", "alpha", "mu"]
    assert len(widgets) == 3


def test_get_returns_a_callable_entry_with_its_metadata(widgets):
    entry = widgets.get("zeta")
    assert isinstance(entry, Entry)
    assert entry(4) == 5 and entry.fn(4) == 5
    assert entry.description == "the last letter"
    assert dict(entry.meta) == {"speed": 3}
    assert dict(widgets.get("alpha").meta) == {}
    with pytest.raises(TypeError):
        entry.meta["speed"] = 4  # read-only: metadata cannot drift after registration


def test_decorator_returns_the_function_unchanged():
    registry = Registry("widget")

    def fn():
        return 42

    assert registry.register("f", description="d")(fn) is fn
    assert registry.get("f").fn is fn


def test_duplicate_name_raises_and_keeps_the_first_entry(widgets):
    first = widgets.get("alpha").fn
    with pytest.raises(ValueError, match=r"widget 'alpha' is already registered"):
        widgets.register("alpha", description="again")(lambda x: x)
    assert widgets.get("alpha").fn is first
    assert widgets.names() == ["zeta", "alpha", "mu"]


def test_unknown_name_raises_value_error_listing_the_choices(widgets):
    with pytest.raises(ValueError) as info:
        widgets.get("omega")
    message = str(info.value)
    assert "unknown widget 'omega'" in message
    assert "zeta, alpha, mu" in message


def test_contains_is_by_name(widgets):
    assert "mu" in widgets
    assert "omega" not in widgets
    assert "MU" not in widgets  # names are case-sensitive


@pytest.mark.parametrize("registry", [PRUNING, QUANTIZATION, REGULARIZERS],
                         ids=lambda r: r.kind)
def test_built_in_registries_offer_none_and_describe_every_entry(registry):
    assert "none" in registry  # every gene's default ("no compression") must be registered
    assert all(isinstance(d, str) and d.strip() for d in registry.describe().values())


def test_every_pruning_entry_declares_whether_it_is_structured():
    assert all(isinstance(entry.meta.get("structured"), bool) for entry in PRUNING)


def test_every_registry_loads_its_built_in_entries_on_first_lookup():
    """No caller imports a module for its side effect: a fresh interpreter that imports only
    petra.registry finds every built-in entry, and the config validates against the same map."""
    import subprocess
    import sys

    code = ("import sys; from petra.registry import REGISTRIES as R; "
            "assert 'petra.compress' not in sys.modules; "
            "print({k: len(r) for k, r in R.items()}); "
            "assert 'magnitude' in R['pruning'] and 'nsga2' in R['strategy'] "
            "and 'digits_cnn' in R['task'] and 'auto_emp' in R['sparsity_rule']")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    counts = eval(out.stdout)  # noqa: S307 - our own dict literal
    assert set(counts) == {"pruning", "sparsity_rule", "rank_rule", "quantization",
                           "regularizer", "strategy", "task"}
    assert all(n > 0 for n in counts.values())


def test_pruning_metadata_is_validated_and_completed_at_registration():
    from petra.registry import Registry

    entry = PRUNING.get("l2_channel")
    assert entry.meta["structured"] is True and entry.meta["scope"] == "layer"
    assert PRUNING.get("magnitude").meta["structured"] is False
    # an unstructured criterion that uses the sparsity gene must rank weights
    with pytest.raises(ValueError, match="must give scores="):
        PRUNING.register("test_unscored", description="x", kind="unstructured")(lambda *a: None)
    assert "test_unscored" not in PRUNING
    for meta, match in (({"kind": "channels"}, "kind must be one of"),
                        ({"structured": True}, "follows from kind"),
                        ({"speed": 3}, "unknown metadata 'speed'"),
                        ({"kind": "lowrank", "trained": True}, "only a structured"),
                        ({"kind": "structured", "trained": True}, "gives gates="),
                        ({"kind": "structured", "gates": len}, "gives gates=")):
        with pytest.raises(ValueError, match=match):
            PRUNING.register("test_bad", description="x", uses_sparsity=False,
                             **meta)(lambda *a: None)
    assert "test_bad" not in PRUNING
    free = Registry("widget")  # without a schema, metadata is free-form
    free.register("w", description="x", speed=3)(lambda: None)
    assert dict(free.get("w").meta) == {"speed": 3}


def test_every_criterion_that_uses_the_sparsity_gene_has_scores():
    for entry in PRUNING:
        if entry.meta["uses_sparsity"] and entry.meta["kind"] == "unstructured":
            assert callable(entry.meta["scores"]), entry.name
