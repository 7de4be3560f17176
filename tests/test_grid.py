"""The grid topology: reading and validating the TOML file, paths, and loads along a path.
Pure functions and a file in tmp_path; no broker."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartgrid.grid import (
    TOPOLOGY_ENV,
    GridState,
    Load,
    Need,
    Node,
    Topology,
    TopologyError,
    limits_in_force,
    load_topology,
    parse_topology,
    topology_from_env,
)
from smartgrid.power import Priority

E, F, S = Priority.EMERGENCY, Priority.FLEET, Priority.STANDARD
no_deadline = settings(deadline=None)

EXAMPLE = """
# A site with two feeders; s3 hangs directly under the site.
[[node]]
id = "site"
limit_kw = 400

[[node]]
id = "feeder-a"
parent = "site"
limit_kw = 150

[[node]]
id = "feeder-b"
parent = "site"
limit_kw = 150.5

[[node]]
id = "s1"
parent = "feeder-a"
limit_kw = 60

[[node]]
id = "s2"
parent = "feeder-a"
limit_kw = 60

[[node]]
id = "s3"
parent = "site"
limit_kw = 100
"""


def example() -> Topology:
    return parse_topology(tomllib.loads(EXAMPLE), "example")


def problems_of(text: str) -> list[str]:
    with pytest.raises(TopologyError) as caught:
        parse_topology(tomllib.loads(text), "grid.toml")
    assert str(caught.value).startswith("grid.toml: ")
    return caught.value.problems


# ------------------------------------------------------------------------------ the file
def test_the_example_reads_as_a_tree_with_limits_in_watts():
    grid = example()
    assert grid.path("s1") == ("s1", "feeder-a", "site")
    assert grid.path("s3") == ("s3", "site")
    assert grid.path("site") == ("site",)
    assert grid.children("site") == ["feeder-a", "feeder-b", "s3"]
    assert grid.nodes["feeder-b"] == Node("feeder-b", 150_500, "site")


def test_the_tree_is_walked_depth_first_in_id_order_with_depths():
    assert list(example().tree()) == [
        ("site", 0),
        ("feeder-a", 1),
        ("s1", 2),
        ("s2", 2),
        ("feeder-b", 1),
        ("s3", 1),
    ]


def test_a_substation_the_file_does_not_name_is_a_root_of_its_own():
    assert example().path("s9") == ("s9",)
    assert Topology().path("s1") == ("s1",)


def test_every_problem_is_reported_at_once():
    problems = problems_of(
        """
        colour = "blue"
        [[node]]
        id = "a"
        limit_kw = 0
        [[node]]
        id = "b"
        parent = "nowhere"
        limit_kw = 10
        limit_KW = 11
        [[node]]
        id = "b"
        limit_kw = 5
        [[node]]
        id = "c d"
        limit_kw = 5
        [[node]]
        id = "e"
        [[node]]
        id = "f"
        limit_kw = "lots"
        [[node]]
        id = "g"
        limit_kw = nan
        [[node]]
        id = "h"
        parent = 7
        limit_kw = 1
        """
    )
    assert problems == [
        "unknown top-level key 'colour' (only [[node]] entries are read)",
        "node 1 ('a'): 'limit_kw' must be above 0, got 0",
        "node 2 ('b'): unknown key 'limit_KW' (expected id, parent, limit_kw)",
        "node 3 ('b'): id 'b' is already node 2",
        "node 4: 'id' must be 1 to 63 characters: letters, digits, _ and - (starting with a "
        "letter or digit), got 'c d'",
        "node 5 ('e'): 'limit_kw' is missing",
        "node 6 ('f'): 'limit_kw' must be a number, got 'lots'",
        "node 7 ('g'): 'limit_kw' must be a number, got nan",
        "node 8 ('h'): 'parent' must be a node id, got 7",
        "node 'b': parent 'nowhere' is not defined",
    ]


def test_a_cycle_is_reported_once_from_its_smallest_id():
    problems = problems_of(
        """
        [[node]]
        id = "x"
        parent = "z"
        limit_kw = 1
        [[node]]
        id = "z"
        parent = "y"
        limit_kw = 1
        [[node]]
        id = "y"
        parent = "x"
        limit_kw = 1
        [[node]]
        id = "below"
        parent = "x"
        limit_kw = 1
        [[node]]
        id = "self"
        parent = "self"
        limit_kw = 1
        """
    )
    assert problems == [
        "cycle: self -> self (each node names the next as its parent)",
        "cycle: x -> z -> y -> x (each node names the next as its parent)",
    ]


@pytest.mark.parametrize(
    "data, problem",
    [
        ([], "expected a table of [[node]] entries"),
        ({"node": {"id": "a"}}, "'node' must be an array of [[node]] tables"),
        ({"node": ["a"]}, "node 1: expected a table"),
        ({"node": [{"id": "a", "limit_kw": True}]}, "'limit_kw' must be a number, got True"),
        ({"node": [{"id": "a", "limit_kw": 0.0004}]}, "'limit_kw' must be above 0"),
    ],
)
def test_malformed_documents_are_refused_with_a_reason(data, problem):
    with pytest.raises(TopologyError) as caught:
        parse_topology(data)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_an_empty_file_is_an_empty_tree():
    assert parse_topology({}) == Topology()


def test_the_file_is_named_by_an_environment_variable(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(EXAMPLE)
    assert topology_from_env({TOPOLOGY_ENV: str(path)}) == example()
    assert topology_from_env({}) == Topology()
    assert topology_from_env({TOPOLOGY_ENV: ""}) == Topology()


def test_a_file_that_is_missing_or_not_toml_is_named_in_the_error(tmp_path):
    with pytest.raises(TopologyError, match="missing.toml: cannot read it"):
        load_topology(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[node]\nid = 1\n")
    with pytest.raises(TopologyError, match=r"broken.toml: not valid TOML: .*line 1"):
        load_topology(broken)


# ------------------------------------------------------------------------------ announcements
def test_a_substation_may_name_its_parent_when_it_announces_itself():
    grid = example().with_announced("s4", "feeder-b", 50_000)
    assert grid.path("s4") == ("s4", "feeder-b", "site")
    assert grid.limit_w("s4") == 50_000


def test_an_announcement_without_a_parent_or_repeating_the_file_changes_nothing():
    grid = example()
    assert grid.with_announced("s9", None, 50_000) is grid
    assert grid.with_announced("s1", "feeder-a", 50_000) is grid
    assert grid.with_announced("s1", None, 50_000) is grid


@pytest.mark.parametrize(
    "substation, parent, words",
    [
        ("s4", "feeder-z", "names parent 'feeder-z', which the topology does not define"),
        ("s1", "feeder-b", "names parent 'feeder-b', but the topology puts it under 'feeder-a'"),
    ],
)
def test_an_announcement_the_tree_cannot_take_is_an_error_and_the_file_wins(
    substation, parent, words
):
    with pytest.raises(TopologyError, match=words):
        example().with_announced(substation, parent, 50_000)


# ------------------------------------------------------------------------------ properties
@st.composite
def trees(draw):
    """A random valid forest: each node's parent is an earlier node or none."""
    count = draw(st.integers(1, 15))
    entries = []
    for index in range(count):
        entry = {"id": f"n{index}", "limit_kw": draw(st.integers(1, 1000))}
        if index and draw(st.booleans()):
            entry["parent"] = f"n{draw(st.integers(0, index - 1))}"
        entries.append(entry)
    order = draw(st.permutations(range(count)))  # the file's order does not matter
    return {"node": [entries[i] for i in order]}


@no_deadline
@given(trees())
def test_every_path_climbs_to_a_root_without_repeating_a_node(data):
    grid = parse_topology(data)
    for node in grid.nodes:
        path = grid.path(node)
        assert len(set(path)) == len(path)
        assert grid.parent(path[-1]) is None
        for child, parent in zip(path, path[1:], strict=False):
            assert grid.parent(child) == parent
            assert child in grid.children(parent)


@no_deadline
@given(trees(), st.data())
def test_pointing_a_node_at_one_of_its_descendants_is_always_reported_as_a_cycle(data, draw):
    grid = parse_topology(data)
    node = draw.draw(st.sampled_from(sorted(grid.nodes)))
    below = [n for n in grid.nodes if node in grid.path(n)]  # node itself included
    target = draw.draw(st.sampled_from(sorted(below)))
    for entry in data["node"]:
        if entry["id"] == node:
            entry["parent"] = target
    with pytest.raises(TopologyError) as caught:
        parse_topology(data)
    assert any(p.startswith("cycle: ") and node in p for p in caught.value.problems)


# ------------------------------------------------------------------------------ loads
def state(loads: dict[str, Load], overrides: dict[str, int] | None = None) -> GridState:
    grid = example()
    return GridState.build(grid, loads, limits_in_force(grid, {}, overrides))


def test_each_node_carries_the_sum_of_the_loads_under_it():
    grid = state({"s1": Load.of(22_000, 6_000, S, 2), "s2": Load.of(11_000, 1_400, E)})
    assert grid.load("feeder-a") == Load(55_000, (1_400, 0, 12_000))
    assert grid.load("site") == grid.load("feeder-a")
    assert grid.load("feeder-b") == Load()


def test_headroom_counts_only_the_minimums_of_the_requests_class_and_higher():
    grid = state({"s1": Load.of(22_000, 20_000, S, 2) + Load.of(22_000, 10_000, F)})
    assert grid.headroom_w("s1", S) == 60_000 - 50_000
    assert grid.headroom_w("s1", F) == 60_000 - 10_000
    assert grid.headroom_w("s1", E) == 60_000


def test_a_request_fits_only_if_every_node_on_its_path_has_room_for_its_minimum():
    grid = state({"s1": Load.of(11_000, 7_000, S, 8), "s2": Load.of(11_000, 7_000, S, 8)})
    # feeder-a: 150 kW - 112 kW of minimums = 38 kW; s2: 60 - 56 = 4 kW.
    assert grid.fits("s1", Need(11_000, 4_000))
    assert not grid.fits("s1", Need(11_000, 4_001))
    cut = state(
        {"s1": Load.of(11_000, 7_000, S, 2), "s2": Load.of(11_000, 7_000, S, 8)},
        overrides={"feeder-a": 80_000},
    )
    assert cut.headroom_w("feeder-a") == 10_000
    assert not cut.fits("s1", Need(11_000, 11_000))  # s1 has room, its feeder has not
    assert cut.fits("s1", Need(11_000, 7_000, E))  # emergency: standard minimums pause


def test_utilisation_after_admission_is_demand_over_limit_at_every_node():
    grid = state({"s1": Load.of(11_000, 1_400, S, 3)})
    assert grid.utilisation_after("s1", Need(15_000, 1_400)) == pytest.approx(
        (48 / 60, 48 / 150, 48 / 400)
    )


def test_the_limit_in_force_is_the_lowest_of_file_announcement_and_override():
    limits = limits_in_force(
        example(), {"s1": 50_000, "s2": 70_000, "s9": 22_000}, {"s2": 40_000, "site": 500_000}
    )
    assert limits["s1"] == 50_000  # announced below the file's 60
    assert limits["s2"] == 40_000  # override
    assert limits["s9"] == 22_000  # not in the file
    assert limits["site"] == 400_000  # an override never raises a limit above its rating
