"""Procedural tasks with known relatedness: `synth.<family>.<index>`.

The default data of the quick start and of long-sequence runs, and a ground
truth for testing that selection finds related tasks. Any number of tasks:
`index` is any non-negative integer.

Key decisions:
- Six data-to-text families (travel, restaurant, hotel, weather, sports,
  movies). A family fixes the slots, values and phrase templates; a task
  (family, index) picks from them: all core slots plus 2 of 4 optional slots,
  the family's shared phrasing of each slot plus one of its two others, the
  shared sentence frame plus one of two others, and all but one value of each
  slot. So tasks of one family share most slots, values and phrasing; tasks of
  different families share (almost) no vocabulary.
- One structurally different family, `listops`: the input is a list of words
  and the output is that list sorted, reversed or copied (no sentence at all).
- The task *structure* depends on the canonical name only (so that
  `task_relatedness` needs no seed); the *samples* depend on (seed, name).
  Both are drawn from `random.Random` seeded with a BLAKE2 hash, never Python's
  salted `hash()`, so data are identical across processes and machines.
- Contexts are MRs in the RNNLG style, `inform(name='x';food='thai')`; a
  data-to-text answer has 2 references (one per sentence frame of the task), a
  listops answer has 1. Every context is distinct across the three splits.
- task_relatedness(a, b) = 1 for the same task, 0 across families, and within
  a family the Jaccard index of the two tasks' feature sets: slots,
  (slot, value) pairs, (slot, phrasing) pairs and sentence frames, i.e. the
  share of what their samples are built from (about 0.2-0.9 in a data-to-text
  family, mean about 0.5). Two listops tasks may draw the same structure (64
  combinations) and then score 1: they are the same function.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import random
import re
from collections.abc import Sequence

from datasets import DatasetDict

from dmea_dist.data.user_tasks import SPLITS, Sample, to_dataset_dict
from dmea_dist.errors import DataError

PREFIX = "synth."


@dataclasses.dataclass(frozen=True)
class _Family:
    """A data-to-text family: `slots` maps slot -> (values, phrasings with {v})."""

    noun: str
    names: tuple[tuple[str, ...], tuple[str, ...]]  # entity name = first + " " + second
    frames: tuple[str, str, str]  # sentence frames with {name}, {noun}, {vp}
    core: tuple[str, str]
    optional: tuple[str, str, str, str]
    slots: dict[str, tuple[tuple[str, ...], tuple[str, str, str]]]


_FAMILIES: dict[str, _Family] = {
    "travel": _Family(
        "trip", (("north", "south", "east", "west", "new", "old"),
                 ("haven", "bridge", "ford", "field", "port", "stone")),
        ("the {noun} to {name} {vp}.", "your {noun} to {name} {vp}.", "a {noun} to {name} {vp}."),
        ("departure", "transport"), ("origin", "duration", "cost", "extras"),
        {"departure": (("monday", "tuesday", "friday", "saturday", "sunday"),
                       ("departs on {v}", "leaves on {v}", "starts on {v}")),
         "transport": (("train", "bus", "plane", "ferry"),
                       ("travels by {v}", "goes by {v}", "uses the {v}")),
         "origin": (("london", "berlin", "madrid", "dublin", "zurich"),
                    ("sets off from {v}", "begins in {v}", "goes out of {v}")),
         "duration": (("two", "three", "five", "ten", "twelve"),
                      ("takes {v} hours", "lasts {v} hours", "is {v} hours long")),
         "cost": (("50 pounds", "80 pounds", "120 pounds", "300 pounds"),
                  ("costs {v}", "is priced at {v}", "comes to {v}")),
         "extras": (("a guided tour", "a hotel night", "travel insurance", "a city pass"),
                    ("includes {v}", "comes with {v}", "bundles {v}"))}),
    "restaurant": _Family(
        "restaurant", (("golden", "blue", "little", "royal", "olive", "green"),
                       ("spoon", "lion", "garden", "kitchen", "table", "lantern")),
        ("{name} is a {noun} that {vp}.", "there is a {noun} called {name} which {vp}.",
         "{name} {vp}."),
        ("food", "area"), ("pricerange", "rating", "near", "drinks"),
        {"food": (("thai", "italian", "french", "indian", "chinese"),
                  ("serves {v} food", "offers {v} dishes", "has a {v} menu")),
         "area": (("riverside", "city centre", "the north side", "the old town"),
                  ("is in {v}", "is located in {v}", "can be found in {v}")),
         "pricerange": (("cheap", "moderate", "expensive", "budget"),
                        ("has {v} prices", "is in the {v} price range", "is considered {v}")),
         "rating": (("low", "average", "high", "excellent"),
                    ("has a {v} customer rating", "is rated {v} by diners", "gets {v} reviews")),
         "near": (("the station", "the museum", "the cathedral", "the market"),
                  ("is near {v}", "is close to {v}", "sits next to {v}")),
         "drinks": (("wine", "cocktails", "craft beer", "fresh juice"),
                    ("serves {v}", "has {v} on offer", "is known for its {v}"))}),
    "hotel": _Family(
        "hotel", (("grand", "park", "harbour", "regent", "crown", "maple"),
                  ("inn", "lodge", "suites", "house", "resort", "manor")),
        ("{name} is a {noun} that {vp}.", "the {noun} {name} {vp}.", "guests say {name} {vp}."),
        ("stars", "district"), ("parking", "wifi", "breakfast", "pets"),
        {"stars": (("two", "three", "four", "five"),
                   ("has {v} stars", "is rated {v} stars", "holds a {v} star rating")),
         "district": (("harbourside", "uptown", "downtown", "the airport zone"),
                      ("lies in {v}", "is situated in {v}", "stands in {v}")),
         "parking": (("free", "paid", "valet", "no"),
                     ("offers {v} parking", "has {v} parking", "provides {v} parking")),
         "wifi": (("free", "paid", "fast", "no"),
                  ("has {v} wifi", "provides {v} internet", "comes with {v} wifi")),
         "breakfast": (("continental", "buffet", "english", "vegan"),
                       ("serves a {v} breakfast", "includes a {v} breakfast",
                        "offers a {v} morning meal")),
         "pets": (("dogs", "cats", "small pets", "no pets"),
                  ("welcomes {v}", "allows {v}", "accepts {v}"))}),
    "weather": _Family(
        "forecast", (("san", "port", "lake", "glen", "fort", "bay"),
                     ("marco", "view", "wood", "ridge", "clare", "ash")),
        ("the {noun} for {name} {vp}.", "in {name} the {noun} {vp}.",
         "the latest {noun} for {name} {vp}."),
        ("day", "condition"), ("temperature", "wind", "humidity", "rainchance"),
        {"day": (("today", "tomorrow", "monday", "the weekend", "friday"),
                 ("is for {v}", "covers {v}", "applies to {v}")),
         "condition": (("sunny", "rainy", "cloudy", "snowy", "foggy"),
                       ("looks {v}", "predicts {v} skies", "turns {v}")),
         "temperature": (("5 degrees", "12 degrees", "20 degrees", "28 degrees"),
                         ("reaches {v}", "peaks at {v}", "has a high of {v}")),
         "wind": (("calm", "light", "strong", "gusty"),
                  ("brings {v} winds", "has {v} winds", "expects {v} winds")),
         "humidity": (("low", "moderate", "high", "very high"),
                      ("shows {v} humidity", "notes {v} humidity", "reports {v} humidity")),
         "rainchance": (("10 percent", "40 percent", "70 percent", "90 percent"),
                        ("gives a {v} chance of rain", "has a {v} rain risk",
                         "puts rain at {v}"))}),
    "sports": _Family(
        "team", (("river", "mountain", "coastal", "valley", "forest", "castle"),
                 ("rangers", "united", "rovers", "eagles", "wolves", "city")),
        ("the {noun} {name} {vp}.", "{name} {vp}.", "this season {name} {vp}."),
        ("result", "opponent"), ("score", "venue", "league", "scorer"),
        {"result": (("won", "lost", "drew"),
                    ("{v} its last match", "{v} on saturday", "{v} the derby")),
         "opponent": (("the lions", "the bears", "the sharks", "the hawks"),
                      ("played against {v}", "faced {v}", "met {v}")),
         "score": (("2 to 1", "3 to 0", "1 to 1", "4 to 2"),
                   ("finished {v}", "ended the game {v}", "saw a final score of {v}")),
         "venue": (("the north stadium", "the city arena", "the old ground", "the bowl"),
                   ("played at {v}", "hosted the game at {v}", "travelled to {v}")),
         "league": (("first", "second", "fifth", "last"),
                    ("sits {v} in the league", "is {v} in the table", "ranks {v} overall")),
         "scorer": (("smith", "jones", "garcia", "silva", "mueller"),
                    ("had goals from {v}", "got goals from {v}", "relied on {v} to score"))}),
    "movies": _Family(
        "film", (("the silent", "the last", "a distant", "the broken", "the hidden", "the long"),
                 ("river", "summer", "signal", "promise", "harbor", "winter")),
        ("{name} is a {noun} that {vp}.", "the {noun} {name} {vp}.", "critics note {name} {vp}."),
        ("genre", "director"), ("year", "runtime", "certificate", "starring"),
        {"genre": (("comedy", "drama", "thriller", "horror", "documentary"),
                   ("is a {v}", "belongs to the {v} genre", "counts as a {v}")),
         "director": (("lee", "kim", "novak", "rossi", "okafor"),
                      ("was directed by {v}", "is by the director {v}", "comes from {v}")),
         "year": (("1994", "2003", "2011", "2019", "2022"),
                  ("came out in {v}", "was released in {v}", "premiered in {v}")),
         "runtime": (("90 minutes", "105 minutes", "120 minutes", "150 minutes"),
                     ("runs for {v}", "lasts {v}", "has a running time of {v}")),
         "certificate": (("pg", "pg-13", "r", "universal"),
                         ("is rated {v}", "carries a {v} certificate", "has an age rating of {v}")),
         "starring": (("ana lopez", "tom reed", "mia chen", "omar aziz"),
                      ("stars {v}", "features {v}", "has {v} in the lead"))}),
}

# listops: MR `<op>(items='w1 w2 w3')` -> the words after the operation.
_LISTOPS_OPS = ("sort_ascending", "sort_descending", "reverse", "copy")
_LISTOPS_VOCABS = {
    "fruits": ("apple", "banana", "cherry", "grape", "kiwi", "lemon", "mango", "olive", "peach",
               "pear"),
    "animals": ("bear", "cat", "deer", "eagle", "fox", "goat", "horse", "lion", "mouse", "owl"),
    "colors": ("amber", "black", "blue", "brown", "cyan", "green", "grey", "pink", "red", "white"),
    "numbers": tuple(str(n) for n in range(10, 100)),  # two digits: text order = number order
}
_LISTOPS_FORMATS = {"space": " ", "comma": ", "}

FAMILIES: tuple[str, ...] = (*_FAMILIES, "listops")


@dataclasses.dataclass(frozen=True)
class TaskStructure:
    """What a task draws its samples from; fixed by (family, index), not by seed."""

    family: str
    index: int
    slots: tuple[str, ...]  # MR slot order (listops: items, op:, vocab:, length: features)
    phrasings: dict[str, tuple[int, ...]]  # slot -> chosen phrasing ids (listops: {})
    frames: tuple[int, ...]  # chosen sentence frame ids (listops: ())
    values: dict[str, tuple[str, ...]]  # slot -> values used by this task (listops: {})
    templates: frozenset[str]  # ids of phrasings and frames, for relatedness

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.family}.{self.index:02d}"


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process (unlike `hash()`)."""
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def parse_synthetic_name(name: str) -> tuple[str, int]:
    """`synth.<family>.<index>` -> (family, index), with a clear error otherwise."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != PREFIX[:-1] or not parts[2].isdigit():
        raise DataError(f"synthetic task {name!r} must be named synth.<family>.<index> with a "
                        f"non-negative integer index, e.g. synth.travel.03; "
                        f"families: {', '.join(FAMILIES)}")
    family = parts[1]
    if family not in FAMILIES:
        close = difflib.get_close_matches(family, FAMILIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"synthetic task {name!r}: unknown family {family!r}{hint}; "
                        f"families: {', '.join(FAMILIES)}")
    return family, int(parts[2])


def task_structure(name: str) -> TaskStructure:
    """The slots, phrasings, frames and values task `name` uses."""
    family, index = parse_synthetic_name(name)
    rng = random.Random(stable_hash("structure", family, index))
    if family == "listops":
        op, vocab = rng.choice(_LISTOPS_OPS), rng.choice(sorted(_LISTOPS_VOCABS))
        fmt, shortest = rng.choice(sorted(_LISTOPS_FORMATS)), rng.choice((3, 4))
        features = ("items", f"op:{op}", f"vocab:{vocab}", f"length:{shortest}-{shortest + 2}")
        return TaskStructure(family, index, features, {}, (), {}, frozenset({f"format:{fmt}"}))
    fam = _FAMILIES[family]
    chosen = set(rng.sample(fam.optional, 2))
    slots = (*fam.core, *(s for s in fam.optional if s in chosen))
    # Phrasing / frame 0 is the family's shared one; each task adds one of the other two.
    phrasings = {s: (0, rng.choice((1, 2))) for s in slots}
    values = {s: tuple(sorted(rng.sample(fam.slots[s][0], len(fam.slots[s][0]) - 1)))
              for s in slots}
    frames = (0, rng.choice((1, 2)))
    templates = frozenset({f"{s}:{k}" for s in slots for k in phrasings[s]}
                          | {f"frame:{k}" for k in frames})
    return TaskStructure(family, index, ("name", *slots), phrasings, frames, values, templates)


def task_relatedness(a: str, b: str) -> float:
    """Ground-truth relatedness in [0, 1]: 1 for the same task, 0 across families, else
    the Jaccard index of the two tasks' feature sets (see `task_features`)."""
    sa, sb = task_structure(a), task_structure(b)
    if (sa.family, sa.index) == (sb.family, sb.index):
        return 1.0
    if sa.family != sb.family:
        return 0.0
    fa, fb = task_features(sa), task_features(sb)
    return len(fa & fb) / len(fa | fb)


def task_features(structure: TaskStructure) -> frozenset[str]:
    """What a task's samples are made of: its slots, (slot, value) pairs, phrasings
    and sentence frames (listops: operation, vocabulary, list lengths, output format)."""
    values = {f"{s}={v}" for s, vs in structure.values.items() for v in vs}
    return frozenset(set(structure.slots) | values | structure.templates)


def synthetic_task_names(n: int, *, families: Sequence[str] | None = None,
                         seed: int = 0) -> list[str]:
    """A sequence of `n` distinct task names: rounds over the families, each round in a
    seeded order, round r using index r; so related tasks recur along the sequence."""
    if not isinstance(n, int) or n < 0:
        raise DataError(f"synthetic_task_names: n must be a non-negative int, got {n!r}")
    families = list(FAMILIES if families is None else families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families or len(set(families)) != len(families):
        raise DataError(f"synthetic_task_names: families {families} must be distinct names "
                        f"from {', '.join(FAMILIES)}")
    rng = random.Random(stable_hash("sequence", seed))
    names: list[str] = []
    for index in range((n + len(families) - 1) // len(families)):
        for family in rng.sample(families, len(families)):
            names.append(f"{PREFIX}{family}.{index:02d}")
    return names[:n]


def load_synthetic_task(name: str, *, seed: int = 0,
                        sizes: Sequence[int] = (400, 50, 50)) -> DatasetDict:
    """Generate task `name` as the standard DatasetDict with `sizes` = (train, val, test)."""
    if len(sizes) != 3 or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise DataError(f"synthetic sizes {tuple(sizes)!r} must be three positive ints "
                        f"(train, validation, test)")
    samples = generate_samples(name, seed=seed, n=sum(sizes))
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    splits = {s: samples[bounds[i]:bounds[i + 1]] for i, s in enumerate(SPLITS)}
    return to_dataset_dict(splits, source=f"synthetic task {name!r}")


def generate_samples(name: str, *, seed: int, n: int) -> list[Sample]:
    """`n` samples with distinct contexts, deterministic by (seed, canonical name)."""
    structure = task_structure(name)
    rng = random.Random(stable_hash("samples", seed, structure.name))
    draw = _listops_sample if structure.family == "listops" else _d2t_sample
    seen: dict[str, Sample] = {}
    for _ in range(50 * n + 100):  # bounded: small task spaces fail clearly below
        sample = draw(structure, rng)
        seen.setdefault(sample.context, sample)
        if len(seen) == n:
            return list(seen.values())
    raise DataError(f"synthetic task {name!r}: could not draw {n} distinct inputs "
                    f"(got {len(seen)}); lower the synthetic sizes")


def _d2t_sample(structure: TaskStructure, rng: random.Random) -> Sample:
    fam = _FAMILIES[structure.family]
    name = f"{rng.choice(fam.names[0])} {rng.choice(fam.names[1])}"
    others = structure.slots[1:]
    chosen = set(rng.sample(others, rng.randint(1, len(others))))
    slots = [s for s in others if s in chosen]  # keep the family's slot order
    values = {s: rng.choice(structure.values[s]) for s in slots}
    context = "inform(" + ";".join([f"name='{name}'", *(f"{s}='{values[s]}'" for s in slots)]) + ")"
    references = []
    for frame in structure.frames:  # one reference per sentence frame of the task
        phrases = [fam.slots[s][1][rng.choice(structure.phrasings[s])].format(v=values[s])
                   for s in slots]
        vp = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        references.append(fam.frames[frame].format(name=name, noun=fam.noun, vp=vp))
    return Sample(context, "", tuple(references))


def _listops_sample(structure: TaskStructure, rng: random.Random) -> Sample:
    op, vocab, length = (f.split(":")[1] for f in structure.slots[1:])
    shortest, longest = (int(x) for x in length.split("-"))
    fmt = next(iter(structure.templates)).removeprefix("format:")
    items = rng.sample(_LISTOPS_VOCABS[vocab], rng.randint(shortest, longest))
    result = {"sort_ascending": sorted(items), "sort_descending": sorted(items, reverse=True),
              "reverse": items[::-1], "copy": items}[op]
    context = f"{op}(items='{' '.join(items)}')"
    return Sample(context, "", (_LISTOPS_FORMATS[fmt].join(result),))


# ------------------------------------------------------------------ fidelity

_MR = re.compile(r"^(\w+)\((.*)\)$")
_SLOT = re.compile(r"^(\w+)='([^']*)'$")


def realises(name: str, context: str, answer: str) -> bool:
    """Does `answer` realise input `context` the way task `name` maps inputs to outputs?

    The ground truth for pseudo-sample fidelity. Data-to-text: the context is an
    MR in this task's form (`inform(name=...;slot=...)` with the name first, at
    least one other slot, only slots of this task, each once, no empty value) and
    the answer mentions the entity name and every slot value of the MR, each as
    whole words and not only inside a longer phrase of the family that contains
    it (another value, or the fixed words of a phrasing: humidity 'high' is not
    said by "very high"). Listops: the context is this task's operation on a
    list of words and the answer is exactly the result, in the task's format.
    An input the task could not have produced (another task's form) is not
    realised; values are not checked against the task's value lists: the
    question is whether the answer says what its own input says.
    """
    structure = task_structure(name)
    match = _MR.match(context.strip())
    if match is None:
        return False
    head, body = match.groups()
    if structure.family == "listops":
        op = structure.slots[1].split(":")[1]
        items_match = re.fullmatch(r"items='([^']*)'", body)
        if head != op or items_match is None or not items_match.group(1).split():
            return False
        items = items_match.group(1).split()
        result = {"sort_ascending": sorted(items), "sort_descending": sorted(items, reverse=True),
                  "reverse": items[::-1], "copy": items}[op]
        fmt = next(iter(structure.templates)).removeprefix("format:")
        return answer.strip() == _LISTOPS_FORMATS[fmt].join(result)
    if head != "inform":
        return False
    pairs = [_SLOT.match(part) for part in body.split(";")]
    if any(p is None for p in pairs):
        return False
    slots = [p.group(1) for p in pairs]
    allowed = {"name", *structure.values}
    if slots[0] != "name" or len(set(slots)) != len(slots) or not set(slots) <= allowed:
        return False
    # the task never writes an input with the name alone, or an empty value: `inform(name='')` was realised
    # by any answer, `inform(name='x')` by any sentence naming x, whatever else it says
    if len(slots) < 2 or not all(p.group(2).strip() for p in pairs):
        return False
    text = answer.lower()
    return all(_said(p.group(2).strip().lower(), text, _phrases(structure.family)) for p in pairs)


def _words(phrase: str) -> re.Pattern[str]:
    # a phrase as whole words (hyphens included): certificate 'r' is not said by "river", nor 'pg' by "pg-13"
    return re.compile(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])")


@functools.cache
def _phrases(family: str) -> tuple[str, ...]:
    """A data-to-text family's fixed wording: its values and the words of its phrasings and frames."""
    fam = _FAMILIES[family]
    texts = [v for values, _ in fam.slots.values() for v in values]
    templates = [t for _, phrasings in fam.slots.values() for t in phrasings]
    templates += [f.replace("{noun}", fam.noun) for f in fam.frames]
    texts += [piece.strip(" .,") for t in templates for piece in re.split(r"\{\w+\}", t)]
    return tuple(sorted({t.lower() for t in texts if t.strip(" .,")}))


def _said(value: str, text: str, phrases: Sequence[str]) -> bool:
    """Is `value` in `text` as whole words, other than inside a longer phrase of the family that contains it?

    As 'pg' is not said by "pg-13": humidity 'high' is not said by "very high humidity" nor by the
    temperature's "has a high of", league 'last' not by "won its last match", parking 'no' not by pets
    'no pets'.
    """
    longer = [m.span() for p in phrases if len(p) > len(value) and _words(value).search(p)
              for m in _words(p).finditer(text)]
    return any(not any(a <= m.start() and m.end() <= b for a, b in longer) for m in _words(value).finditer(text))


def fidelity(name: str, rows: Sequence[dict]) -> float | None:
    """Share of pseudo-sample rows (`context`, `answer` list) whose answer realises its own input.

    None for a task that is not synthetic (no generator knows its mapping) or no rows.
    """
    if not name.startswith(PREFIX) or not rows:
        return None
    return sum(realises(name, r["context"], r["answer"][0]) for r in rows) / len(rows)
