"""Synthetic tasks: determinism, schema, known relatedness visible in the data itself."""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from dmea_dist.data.synthetic import (
    FAMILIES,
    load_synthetic_task,
    synthetic_task_names,
    task_relatedness,
    task_structure,
)
from dmea_dist.data.user_tasks import TASK_FEATURES
from dmea_dist.errors import DataError

D2T = [f for f in FAMILIES if f != "listops"]
SMALL = (60, 10, 10)


def _all_rows(tasks):
    return {split: tasks[split].to_list() for split in tasks}


def test_families_cover_the_brief():
    assert len(D2T) >= 5 and "listops" in FAMILIES


def test_same_seed_identical_other_seed_different():
    a = load_synthetic_task("synth.travel.03", seed=7, sizes=SMALL)
    b = load_synthetic_task("synth.travel.03", seed=7, sizes=SMALL)
    c = load_synthetic_task("synth.travel.03", seed=8, sizes=SMALL)
    assert _all_rows(a) == _all_rows(b)
    assert _all_rows(a)["train"] != _all_rows(c)["train"]
    # Index spelling does not matter: 3 and 03 are the same task.
    assert _all_rows(load_synthetic_task("synth.travel.3", seed=7, sizes=SMALL)) == _all_rows(a)


def test_data_do_not_depend_on_python_hash_seed():
    code = ("from dmea_dist.data.synthetic import load_synthetic_task as f;"
            "print(f('synth.hotel.05', sizes=(3, 1, 1))['train'][2]['context'])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    assert len(outs) == 1
    assert outs == {load_synthetic_task("synth.hotel.05", sizes=(3, 1, 1))["train"][2]["context"]
                    + "\n"}


@pytest.mark.parametrize("family", FAMILIES)
def test_schema_sizes_and_distinct_inputs(family):
    tasks = load_synthetic_task(f"synth.{family}.11", sizes=(50, 7, 9))
    assert {s: len(d) for s, d in tasks.items()} == {"train": 50, "validation": 7, "test": 9}
    contexts = [c for d in tasks.values() for c in d["context"]]
    assert len(set(contexts)) == len(contexts)  # no input in two splits
    for split in tasks.values():
        assert split.features == TASK_FEATURES
        assert set(split["question"]) == {""}
        assert all(1 <= len(a) <= 2 and all(a) for a in split["answer"])


def test_d2t_context_is_an_mr_naming_the_task_slots():
    structure = task_structure("synth.restaurant.02")
    for row in load_synthetic_task("synth.restaurant.02", sizes=SMALL)["train"]:
        match = re.fullmatch(r"inform\((.*)\)", row["context"])
        pairs = dict(re.findall(r"(\w+)='([^']*)'", match.group(1)))
        assert set(pairs) <= set(structure.slots) and "name" in pairs
        assert all(pairs["name"] in ref for ref in row["answer"])
        assert all(v in structure.values[s] for s, v in pairs.items() if s != "name")


def test_listops_is_structurally_different_and_correct():
    for index in range(8):
        name = f"synth.listops.{index}"
        op = task_structure(name).slots[1].removeprefix("op:")
        for row in load_synthetic_task(name, sizes=(20, 2, 2))["train"]:
            act, items = re.fullmatch(r"(\w+)\(items='([^']*)'\)", row["context"]).groups()
            items = items.split()
            assert act == op and len(row["answer"]) == 1
            out = re.split(r",? ", row["answer"][0])
            expected = {"sort_ascending": sorted(items), "sort_descending": sorted(items)[::-1],
                        "reverse": items[::-1], "copy": items}[op]
            assert out == expected


def test_any_index_and_unknown_family():
    assert len(load_synthetic_task("synth.sports.1234", sizes=(2, 1, 1))["test"]) == 1
    with pytest.raises(DataError, match=r"unknown family 'travle' \(did you mean 'travel'\?\)"
                                        r".*listops"):
        load_synthetic_task("synth.travle.01")
    with pytest.raises(DataError, match="synth.<family>.<index>"):
        load_synthetic_task("synth.travel.-1")
    with pytest.raises(DataError, match="three positive ints"):
        load_synthetic_task("synth.travel.01", sizes=(10, 0, 5))


def test_relatedness_properties():
    names = [f"synth.{f}.{i:02d}" for f in FAMILIES for i in range(5)]
    for a, b in itertools.product(names, names):
        r = task_relatedness(a, b)
        assert 0.0 <= r <= 1.0
        assert r == task_relatedness(b, a)
        if a == b:
            assert r == 1.0
        elif a.split(".")[1] != b.split(".")[1]:
            assert r == 0.0
        else:
            assert r > 0.0
    same = [task_relatedness(f"synth.{f}.00", f"synth.{f}.{i:02d}") for f in D2T for i in (1, 2)]
    assert min(same) > 0.15 and sum(same) / len(same) > 0.35  # "high" within a family


def _token_frequencies(name):
    counts = Counter()
    for row in load_synthetic_task(name, sizes=(150, 5, 5))["train"]:
        counts.update(re.findall(r"[a-z0-9]+", (row["context"] + " " + " ".join(row["answer"]))))
    return counts


def _cosine(a, b):
    dot = sum(a[k] * b[k] for k in a)
    return dot / math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))


def test_same_family_data_are_more_similar_than_cross_family():
    # The similarity DMEA's expansion uses (token-frequency cosine) must see the families.
    freqs = {(f, i): _token_frequencies(f"synth.{f}.{i:02d}") for f in FAMILIES for i in range(3)}
    for family in FAMILIES:
        mine = [k for k in freqs if k[0] == family]
        same = min(_cosine(freqs[a], freqs[b]) for a, b in itertools.combinations(mine, 2))
        cross = max(_cosine(freqs[a], freqs[b]) for a in mine for b in freqs if b[0] != family)
        assert same > cross, family


def test_same_family_tasks_share_slots_cross_family_do_not():
    slots = {f: [set(task_structure(f"synth.{f}.{i}").slots) - {"name"} for i in range(6)]
             for f in D2T}
    for family, sets in slots.items():
        assert all(len(a & b) >= 2 for a, b in itertools.combinations(sets, 2))
        others = set().union(*(s for f, ss in slots.items() if f != family for s in ss))
        assert not set().union(*sets) & others


def test_task_names_for_long_sequences():
    names = synthetic_task_names(50, seed=3)
    assert len(names) == len(set(names)) == 50
    assert names == synthetic_task_names(50, seed=3) != synthetic_task_names(50, seed=4)
    counts = Counter(n.split(".")[1] for n in names)
    assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
    two = synthetic_task_names(5, families=["hotel", "weather"])
    assert {n.split(".")[1] for n in two} == {"hotel", "weather"}
    assert synthetic_task_names(0) == []
    with pytest.raises(DataError, match="listops"):
        synthetic_task_names(3, families=["nope"])


# ---------------------------------------------------------------- fidelity


@pytest.mark.parametrize("name", ["synth.restaurant.00", "synth.hotel.03", "synth.listops.00", "synth.listops.05"])
def test_every_real_sample_realises_its_input(name):
    from dmea_dist.data.synthetic import fidelity

    rows = load_synthetic_task(name, seed=3, sizes=(40, 5, 5))["train"].to_list()
    assert fidelity(name, rows) == 1.0


def test_realises_catches_wrong_missing_and_foreign():
    from dmea_dist.data.synthetic import realises

    name = "synth.restaurant.00"
    row = load_synthetic_task(name, sizes=(5, 1, 1))["train"][0]
    context, answer = row["context"], row["answer"][0]
    assert realises(name, context, answer)
    name_value = re.search(r"name='([^']*)'", context).group(1)
    assert not realises(name, context, answer.replace(name_value, "somewhere else"))  # wrong entity
    assert not realises(name, context, answer[: len(answer) // 3])  # values left out
    assert not realises(name, context.replace("inform(", "request("), answer)  # not this task's form
    assert not realises(name, "inform(name='x';stars='five')", "x has five stars")  # a hotel slot
    assert not realises(name, "no mr at all", answer)
    listops = "synth.listops.00"
    row = load_synthetic_task(listops, sizes=(5, 1, 1))["train"][0]
    assert realises(listops, row["context"], row["answer"][0])
    assert not realises(listops, row["context"], row["answer"][0] + " extra")


def test_realises_needs_each_value_as_a_word_not_inside_another_word():
    """A value counts as said only as a whole word: certificate 'r' is not in "river", wifi 'fast' not in
    "breakfast", 'pg' not in "pg-13"."""
    from dmea_dist.data.synthetic import realises

    movies, hotel = "synth.movies.00", "synth.hotel.01"  # movies.00 has certificate (pg, pg-13, r)
    context = "inform(name='the long river';genre='drama';certificate='r')"
    assert realises(movies, context, "the long river is a drama and is rated r.")
    assert not realises(movies, context, "the long river is a drama.")  # the certificate left out
    assert not realises(movies, "inform(name='the long river';certificate='pg')", "the long river is rated pg-13.")
    context = "inform(name='grand inn';wifi='fast';breakfast='vegan')"  # hotel.01 has wifi and breakfast
    assert realises(hotel, context, "grand inn has fast wifi and serves a vegan breakfast.")
    assert not realises(hotel, context, "grand inn serves a vegan breakfast.")  # the wifi left out


def test_realises_refuses_inputs_the_task_never_writes_name_alone_or_empty_values():
    """Every generated input has the name and at least one slot, none empty; a pseudo input without would be
    realised by any answer (empty values: nothing to say) or by any sentence naming the entity."""
    from dmea_dist.data.synthetic import fidelity, realises

    name = "synth.restaurant.00"  # restaurant.00 has food, area, pricerange, near
    # the model's own pseudo sample (quick start): the input says nothing of what is near
    assert not realises(name, "inform(name='golden lion')", "golden lion is a restaurant that is close to the cathedral.")
    assert not realises(name, "inform(name='')", "anything at all.")
    assert not realises(name, "inform(name='';food='')", "anything at all.")
    assert not realises(name, "inform(name='golden lion';food=' ')", "golden lion is a restaurant.")
    assert realises(name, "inform(name='golden lion';food='thai')", "golden lion is a restaurant that serves thai food.")
    for family in D2T:  # every generated input still passes, whatever the family
        task = f"synth.{family}.02"
        assert fidelity(task, load_synthetic_task(task, seed=1, sizes=(60, 5, 5))["train"].to_list()) == 1.0


def test_realises_does_not_count_a_value_said_only_inside_a_longer_phrase_of_the_family():
    """As 'pg' is not said by "pg-13": a value said only as part of another value, or of the fixed words of
    another slot's phrasing, is not said (the family's only such cases, all four)."""
    from dmea_dist.data.synthetic import realises

    weather = "synth.weather.03"  # humidity (high, low, very high); temperature phrasing "has a high of {v}"
    context = "inform(name='san wood';day='today';temperature='20 degrees';humidity='high')"
    assert realises(weather, context, "the forecast for san wood is for today, reaches 20 degrees and shows high "
                                      "humidity.")
    assert realises(weather, context, "the forecast for san wood is for today, has a high of 20 degrees and "
                                      "shows high humidity.")
    assert not realises(weather, context, "the forecast for san wood is for today, reaches 20 degrees and shows "
                                          "very high humidity.")  # another value
    assert not realises(weather, context, "the forecast for san wood is for today and has a high of 20 degrees.")
    sports = "synth.sports.02"  # league (fifth, first, last); result phrasing "{v} its last match"
    context = "inform(name='river united';result='won';league='last')"
    assert realises(sports, context, "river united won its last match and sits last in the league.")
    assert not realises(sports, context, "river united won its last match.")
    hotel = "synth.hotel.09"  # parking (free, no, valet), pets (cats, dogs, no pets)
    context = "inform(name='grand inn';parking='no';pets='no pets')"
    assert realises(hotel, context, "grand inn is a hotel that has no parking and welcomes no pets.")
    assert not realises(hotel, context, "grand inn is a hotel that welcomes no pets.")


def test_fidelity_is_none_without_a_generator():
    from dmea_dist.data.synthetic import fidelity

    assert fidelity("e2e", [{"context": "name[x]", "answer": ["x"]}]) is None
    assert fidelity("synth.travel.00", []) is None


@pytest.mark.parametrize("typed", ["synth.restaurant.1000", "synth.restaurant.01000"])
def test_a_sequence_task_that_is_a_held_out_pretraining_task_is_refused_however_its_index_is_written(typed):
    """synth.restaurant.01000 is synth.restaurant.1000 (same data): the backbone must not pretrain on it."""
    from dmea_dist.config import config_from_dict
    from dmea_dist.errors import ConfigError
    from dmea_dist.run import Task, pretraining_samples

    config = config_from_dict({"name": "x", "data": {"tasks": [typed], "synth_sizes": [8, 2, 2]},
                               "model": {"tiny": {"pretrain": {"heldout_tasks": 1}}}})
    with pytest.raises(ConfigError, match="held-out pretraining task"):
        pretraining_samples(config, [Task(typed, 0, {})])
