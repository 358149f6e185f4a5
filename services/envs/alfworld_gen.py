"""Offline generator of ALFRED-domain games for the real ALFWorld text engine.

ALFWorld's games (``json_2.1.1``) are downloaded from GitHub by
``alfworld-download``, which this machine (and CI) cannot reach. Everything
else a game needs ships in the ``alfworld`` wheel: the PDDL domain
(``alfred.pddl``), the text grammar (``alfred.twl2``), the 120 scene layouts
(``gen/layouts/FloorPlan*-{objects,openable}.json``: which object classes a
room holds and where each receptacle instance stands), the affordance tables
(``gen/constants.py``: which receptacle class can hold which object class,
what is heatable/coolable/cleanable/toggleable) and the goal library
(``gen/goal_library.py``: the PDDL goal and the task-text templates of every
task type). This module combines them into a ``game.tw-pddl`` +
``traj_data.json`` pair in the benchmark's own format, so ALFWorld's engine,
demangler and experts run unchanged on it.

What differs from the benchmark: object placements are sampled (the benchmark
took them from AI2-THOR scene states), coordinates in object ids are synthetic,
decorative non-interactive objects (windows, chairs...) are left out, and the
task text always comes from the templates (no human annotations). Each
generated game is checked by playing the PDDL planner's plan in the engine;
the plan is stored as the game's ``walkthrough``.

Splits follow ALFWorld's: ``train`` and ``valid_seen`` use the training scenes
(different seeds), ``valid_unseen`` the four scenes ALFRED holds out
(FloorPlan 10, 219, 308, 424).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

TASK_TYPES = {
    "pick": "pick_and_place_simple",
    "look": "look_at_obj_in_light",
    "clean": "pick_clean_then_place_in_recep",
    "heat": "pick_heat_then_place_in_recep",
    "cool": "pick_cool_then_place_in_recep",
    "pick2": "pick_two_obj_and_place",
}
SHORT_NAME = {v: k for k, v in TASK_TYPES.items()}
UNSEEN_SCENES = (10, 219, 308, 424)
_APPLIANCE = {"clean": "SinkBasin", "heat": "Microwave", "cool": "Fridge"}
_ACTION_SET = {"clean": "Cleanable", "heat": "Heatable", "cool": "Coolable"}
DISTRACTOR_CLASSES = 8  # other object classes placed besides the target
_LAMP_HOLDERS = ("Desk", "SideTable", "Dresser", "Shelf", "CoffeeTable", "DiningTable")


class GenerationError(RuntimeError):
    """No valid game of the requested kind exists for this scene / seed."""


def _alfworld_root() -> Path:
    import alfworld

    return Path(alfworld.__file__).parent


def mangle(name: str) -> str:
    """ALFRED object id -> PDDL identifier (the benchmark's encoding)."""
    for a, b in (("|", "_bar_"), ("+", "_plus_"), ("-", "_minus_"), (".", "_dot_"), (",", "_comma_")):
        name = name.replace(a, b)
    return name


@dataclass(frozen=True)
class Receptacle:
    rid: str  # ALFRED id, e.g. "Sink|-01.90|+00.97|-01.50|SinkBasin"
    rtype: str
    loc: str  # ALFRED location id


@lru_cache(maxsize=1)
def _constants():
    import alfworld.gen.constants as c

    return c


def scene_numbers() -> list[int]:
    root = _alfworld_root() / "gen" / "layouts"
    return sorted(int(p.name[len("FloorPlan"):-len("-objects.json")]) for p in root.glob("FloorPlan*-objects.json"))


@lru_cache(maxsize=256)
def load_scene(floorplan: int) -> tuple[tuple[str, ...], tuple[Receptacle, ...], tuple[tuple[float, float], ...]]:
    """(object classes, receptacle instances, navigable points) of one layout."""
    root = _alfworld_root() / "gen" / "layouts"
    objects = tuple(json.loads((root / f"FloorPlan{floorplan}-objects.json").read_text()))
    poses = json.loads((root / f"FloorPlan{floorplan}-openable.json").read_text())
    c = _constants()
    recs = []
    for rid, (x, z, rot, hor) in sorted(poses.items()):
        rtype = rid.split("|")[-1] if rid.count("|") == 4 else rid.split("|")[0]
        if rtype not in c.VAL_RECEPTACLE_OBJECTS or rtype in c.MOVABLE_RECEPTACLES:
            continue  # movable receptacles (box, bowl...) are objects in the text domain
        loc = f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{round(rot / 90) % 4}|{int(hor)}"
        recs.append(Receptacle(rid, rtype, loc))
    import numpy as np

    points = tuple((float(a), float(b)) for a, b in np.load(root / f"FloorPlan{floorplan}-layout.npy"))
    return objects, tuple(recs), points


def split_scenes(split: str) -> list[int]:
    scenes = scene_numbers()
    if split == "valid_unseen":
        return [s for s in scenes if s in UNSEEN_SCENES]
    if split in ("train", "valid_seen"):
        return [s for s in scenes if s not in UNSEEN_SCENES]
    raise GenerationError(f"unknown ALFWorld split {split!r}; use train, valid_seen or valid_unseen")


def _can_hold(rtype: str, otype: str) -> bool:
    return otype in _constants().VAL_RECEPTACLE_OBJECTS.get(rtype, ())


def _pickupable_classes(objects: tuple[str, ...]) -> list[str]:
    c = _constants()
    holdable = set().union(*c.VAL_RECEPTACLE_OBJECTS.values())
    return sorted(o for o in set(objects) if o in holdable and o in c.OBJECTS and "Sliced" not in o)


def _room_ok(floorplan: int, task: str) -> bool:
    room = {0: "Kitchen", 2: "LivingRoom", 3: "Bedroom", 4: "Bathroom"}[floorplan // 100]
    return room in _constants().GOALS_VALID[TASK_TYPES[task]]


def _choose_goal(task: str, objects, recs, rng: random.Random) -> dict[str, str]:
    """Pick (object, receptacle[, lamp]) classes the scene supports for ``task``."""
    c = _constants()
    rtypes = sorted({r.rtype for r in recs})
    pick = _pickupable_classes(objects)
    if task in _APPLIANCE:
        if _APPLIANCE[task] not in rtypes:
            raise GenerationError(f"no {_APPLIANCE[task]} in this scene")
        pick = [o for o in pick if o in c.VAL_ACTION_OBJECTS[_ACTION_SET[task]]]
    if task == "look":
        if "DeskLamp" not in objects or not any(r in rtypes for r in _LAMP_HOLDERS):
            raise GenerationError("no desk lamp (or nothing to stand it on) in this scene")
    pairs = []
    for o in pick:
        if not any(_can_hold(r, o) for r in rtypes):
            continue  # the object could not be placed anywhere
        if task == "look":
            pairs.append((o, ""))
            continue
        for r in rtypes:
            if _can_hold(r, o) and r != _APPLIANCE.get(task):
                pairs.append((o, r))
    if not pairs:
        raise GenerationError(f"no object/receptacle pair for {task} in this scene")
    obj, parent = rng.choice(pairs)
    return {"object_target": obj, "parent_target": parent,
            "toggle_target": "DeskLamp" if task == "look" else "", "mrecep_target": "", "object_sliced": False}


def _coord(v: float) -> str:
    return f"{v:+06.2f}"


def build_problem(floorplan: int, task: str, seed: int,
                  distractors: int = DISTRACTOR_CLASSES) -> tuple[str, dict[str, Any], str]:
    """(pddl problem text, traj_data dict, task description) for one generated game.

    ``distractors`` caps how many other object classes are placed: the engine's
    admissible-command grounding grows with objects x receptacles, and the full
    room (~45 objects) runs at ~2 steps/s on a loaded 2-core machine.
    """
    if task not in TASK_TYPES:
        raise GenerationError(f"unknown task type {task!r}; known: {', '.join(TASK_TYPES)}")
    if not _room_ok(floorplan, task):
        raise GenerationError(f"{task} tasks do not occur in FloorPlan{floorplan}'s room type")
    rng = random.Random(f"{floorplan}/{task}/{seed}")
    objects, recs, points = load_scene(floorplan)
    params = _choose_goal(task, objects, recs, rng)
    obj, parent = params["object_target"], params["parent_target"]

    # Place 1-3 instances of every pickupable class (2-3 of the target for pick2) in
    # receptacles that can hold them; never start the target already in a goal receptacle.
    placements: list[tuple[str, str, Receptacle]] = []  # (ALFRED id, class, receptacle)
    used: set[str] = set()
    others = [o for o in _pickupable_classes(objects) if o != obj]
    classes = sorted([obj] + rng.sample(others, min(distractors, len(others))))
    for o in classes:
        holders = [r for r in recs if _can_hold(r.rtype, o)]
        if o == obj:
            holders = [r for r in holders if r.rtype != parent and r.rtype != _APPLIANCE.get(task)]
        if not holders:
            if o == obj:
                raise GenerationError(f"nowhere to put the {o} except its goal receptacle")
            continue
        lo = 2 if (o == obj and task == "pick2") else 1
        for _ in range(rng.randint(lo, max(lo, 3 if o == obj else 2))):
            r = rng.choice(holders)
            x, y, z = (float(v) for v in r.rid.split("|")[1:4])
            while True:
                oid = f"{o}|{_coord(x + rng.uniform(-0.4, 0.4))}|{_coord(y + rng.uniform(0, 0.3))}|" \
                      f"{_coord(z + rng.uniform(-0.4, 0.4))}"
                if oid not in used:
                    break
            used.add(oid)
            placements.append((oid, o, r))
    if task == "look":
        holders = [r for r in recs if r.rtype in _LAMP_HOLDERS]
        r = rng.choice(holders)
        x, y, z = (float(v) for v in r.rid.split("|")[1:4])
        placements.append((f"DeskLamp|{_coord(x)}|{_coord(y + 0.5)}|{_coord(z)}", "DeskLamp", r))
    px, pz = rng.choice(points)
    start = f"loc|{round(px / 0.25)}|{round(pz / 0.25)}|{rng.randrange(4)}|30"
    problem = _render_problem(f"gen_{floorplan}_{task}_{seed}", placements, recs, start, task, params)
    desc = rng.choice(_goal_library()[TASK_TYPES[task]]["templates"]).format(
        obj=obj.lower(), recep=parent.lower(), toggle=params["toggle_target"].lower(), mrecep="")
    traj = {"task_type": TASK_TYPES[task], "pddl_params": params,
            "scene": {"floor_plan": f"FloorPlan{floorplan}", "scene_num": floorplan, "random_seed": seed},
            "turk_annotations": {"anns": [{"task_desc": desc}]}, "generated_by": "proxmo alfworld_gen"}
    return problem, traj, desc


@lru_cache(maxsize=1)
def _goal_library() -> dict[str, Any]:
    import alfworld.gen.goal_library as glib

    return glib.gdict


def _render_problem(name: str, placements, recs, start: str, task: str, params: dict) -> str:
    c = _constants()
    m = mangle
    # A class is either an object type or a receptacle type (Mug, Bowl... are objects here).
    rtypes = sorted(set(c.VAL_RECEPTACLE_OBJECTS) - set(c.MOVABLE_RECEPTACLES))
    otypes = sorted((set(c.OBJECTS) | {"DeskLamp"}) - set(rtypes))
    locs = sorted({r.loc for r in recs} | {start})
    decl = ["agent1 - agent"] + [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
    decl += [f"{m(oid)} - object" for oid, _, _ in placements]
    decl += [f"{m(r.rid)} - receptacle" for r in recs] + [f"{m(loc)} - location" for loc in locs]
    init = [f"(atLocation agent1 {m(start)})"]
    for r in recs:
        init.append(f"(receptacleType {m(r.rid)} {r.rtype}Type)")
        init.append(f"(receptacleAtLocation {m(r.rid)} {m(r.loc)})")
        if r.rtype in c.OPENABLE_CLASS_LIST:
            init.append(f"(openable {m(r.rid)})")
    for rt in sorted({r.rtype for r in recs}):
        init += [f"(canContain {rt}Type {ot}Type)" for ot in sorted(c.VAL_RECEPTACLE_OBJECTS[rt]) if ot in otypes]
    for oid, o, r in placements:
        init += [f"(objectType {m(oid)} {o}Type)", f"(inReceptacle {m(oid)} {m(r.rid)})",
                 f"(objectAtLocation {m(oid)} {m(r.loc)})"]
        if o == "DeskLamp":
            init.append(f"(toggleable {m(oid)})")
            continue
        init.append(f"(pickupable {m(oid)})")
        for pred, group in (("cleanable", "Cleanable"), ("heatable", "Heatable"), ("coolable", "Coolable")):
            if o in c.VAL_ACTION_OBJECTS[group]:
                init.append(f"({pred} {m(oid)})")
    goal = _goal_library()[TASK_TYPES[task]]["pddl"].replace("#", "-").format(
        obj=params["object_target"], recep=params["parent_target"], toggle=params["toggle_target"], mrecep="")
    nl = "\n        "
    return (f"(define (problem {name})\n(:domain alfred)\n(:objects\n        {nl.join(decl)}\n)\n"
            f"(:init\n        {nl.join(init)}\n)\n{goal}\n")


def write_game(out_dir: Path, floorplan: int, task: str, seed: int) -> Path:
    """Write ``game.tw-pddl`` + ``traj_data.json`` into ``out_dir``; verify with the planner."""
    problem, traj, desc = build_problem(floorplan, task, seed)
    root = _alfworld_root() / "data"
    grammar = (root / "alfred.twl2").read_text().replace("UNKNOWN GOAL", desc)
    game = {"pddl_domain": (root / "alfred.pddl").read_text(), "grammar": grammar,
            "pddl_problem": problem, "solvable": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "game.tw-pddl.tmp"
    tmp.write_text(json.dumps(game))
    (out_dir / "traj_data.json").write_text(json.dumps(traj, indent=1))
    path = out_dir / "game.tw-pddl"
    tmp.replace(path)
    plan = solve(path)
    game["walkthrough"] = plan
    tmp.write_text(json.dumps(game))
    tmp.replace(path)
    return path


def solve(path: Path) -> list[str]:
    """Play the planner's plan in the real engine; return it if it wins, else raise."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler

    infos = textworld.EnvInfos(admissible_commands=True, won=True, policy_commands=True)
    env = textworld.start(str(path), request_infos=infos, wrappers=[AlfredDemangler()])
    try:
        state = env.reset()
        plan = list(state.get("policy_commands") or [])
        if not plan:
            raise GenerationError(f"the planner found no plan for {path}")
        for cmd in plan:
            state, _, done = env.step(cmd)
            if done:
                break
        if not state.get("won"):
            raise GenerationError(f"the planner's plan does not win {path}")
        return plan
    finally:
        env.close()


def generate(out_root: Path, split: str, task: str, seed: int, max_tries: int = 50) -> Path:
    """The game for (split, task, seed): the first scene/sub-seed that yields a solvable game."""
    scenes = [s for s in split_scenes(split) if _room_ok(s, task)]
    rng = random.Random(f"{split}/{task}/{seed}")
    last: Exception | None = None
    for attempt in range(max_tries):
        floorplan = rng.choice(scenes)
        out_dir = out_root / split / f"{TASK_TYPES[task]}-{seed}" / f"FloorPlan{floorplan}-{attempt}"
        if (out_dir / "game.tw-pddl").exists() and "walkthrough" in json.loads((out_dir / "game.tw-pddl").read_text()):
            return out_dir / "game.tw-pddl"
        try:
            return write_game(out_dir, floorplan, task, seed * 1000 + attempt)
        except GenerationError as exc:
            last = exc
            for f in ("game.tw-pddl", "traj_data.json", "game.tw-pddl.tmp"):
                (out_dir / f).unlink(missing_ok=True)
    raise GenerationError(f"no solvable {task} game for {split}/{seed} after {max_tries} tries: {last}")
