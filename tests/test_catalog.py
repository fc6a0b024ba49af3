"""The catalog as the one owner of characters: keys, scopes, store validation, invariants."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from neeko.cards import card_from_fields
from neeko.catalog import Catalog
from neeko.characters import LOCAL, SHARED, CatalogError, fold, guild_scope, scope_key
from neeko.protocol import CatalogEvent
from neeko.runtime import CAST_STORE

A, B = guild_scope(111), guild_scope(222)
COLLIDING = [
    "BOLT 7",
    "Bolt 7",
    "ＢＯＬＴ－７",
    "Captain Mára Vell",
    "Captain Mara Vell!",
    "Sato-Hana",
]


@pytest.fixture
def cast(tmp_path) -> Catalog:
    """A writable copy of the starter cast's store."""
    shutil.copytree(CAST_STORE, tmp_path / "store")
    return Catalog.open(tmp_path / "store")


def card(name: str, profile: str = "", **fields):
    return card_from_fields(name, profile or f"{name} is someone new in town.", **fields)


def snapshot(catalog: Catalog) -> dict:
    return {k: (c.name, c.scope, c.status, dict(c.mix)) for k, c in catalog.characters.items()}


@pytest.mark.parametrize("scope", [SHARED, LOCAL, A])
@pytest.mark.parametrize("name", COLLIDING)
def test_a_name_that_folds_to_a_cast_member_is_refused_everywhere(cast, scope, name):
    before = snapshot(cast)
    with pytest.raises(CatalogError, match="already taken"):
        cast.add(card(name), scope, mix={})
    assert snapshot(cast) == before
    assert cast.find(name, scope).scope == SHARED


def test_fold_and_keys():
    assert fold("  Captain   MÁRA-Vell!! ") == "captain mara vell"
    assert fold("ＢＯＬＴ－７") == fold("bolt_7") == "bolt 7"
    assert fold("ガ") != fold("カ")  # kana keep their voicing marks
    assert scope_key(SHARED, "BOLT-7") == "bolt_7"
    assert scope_key(A, "Nami") == "g111.nami"
    assert scope_key(LOCAL, "Nami", 3) == "local.nami-3"
    with pytest.raises(CatalogError, match="no letter or digit"):
        scope_key(SHARED, "!!!")


def test_non_latin_keys_are_the_same_in_every_process():
    code = "from neeko.characters import scope_key; print(scope_key('guild:5', '七海 Nanami'))"
    keys = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        keys.add(out.stdout.strip())
    assert len(keys) == 1
    (key,) = keys
    assert key.startswith("g5.nanami_")
    assert key.isascii()


def test_servers_see_their_own_characters_and_the_cast_only(cast):
    nami_a = cast.add(card("Nami", "A navigator who loves maps."), A, mix={})
    nami_b = cast.add(card("NAMI", "A baker who hates maps."), B, mix={})
    assert nami_a.key != nami_b.key
    assert cast.find("nami", A) == nami_a
    assert cast.find("nami", B) == nami_b
    assert cast.find("nami", LOCAL) is None
    assert {c.scope for c in cast.visible(A)} == {SHARED, A}
    with pytest.raises(CatalogError, match="already taken"):
        cast.add(card("Nami"), A, mix={})
    with pytest.raises(CatalogError, match="already taken"):  # the cast may not shadow a server
        cast.add(card("Nami"), SHARED, mix={})
    assert cast.resolve("Nam", B).suggestions == ("NAMI",)


def test_fusion_sees_only_what_the_scope_sees(cast):
    cast.add(card("Sea Witch", "A pirate sea witch of the salty waves."), A, "trained")
    fused_b = cast.add(card("Old Salt", "A gruff old pirate of the salty seas."), B)
    assert fused_b.mix
    assert all(cast.get(k).scope == SHARED for k in fused_b.mix)
    fused_a = cast.add(card("Older Salt", "A gruff old pirate of the salty seas."), A)
    assert any(cast.get(k).scope == A for k in fused_a.mix)


def test_keys_are_never_reused_or_taken(cast):
    first = cast.add(card("Nami"), A, mix={})
    cast.remove(first.key)
    assert cast.retired(first.key)
    again = cast.add(card("Nami"), A, mix={})
    assert again.key == f"{first.key}-2"
    for key, error in [
        (first.key, "removed character"),
        (again.key, "taken"),
        ("bolt_7", "does not belong"),
        ("g222.nova", "does not belong"),
        ("../../x", "not a valid character key"),
    ]:
        with pytest.raises(CatalogError, match=error):
            cast.add(card("Nova"), A, key=key, mix={})
    cast.save()
    reopened = Catalog.open(cast.folder)
    assert reopened.retired(first.key)
    assert snapshot(reopened) == snapshot(cast)


def test_characters_cannot_be_changed_from_outside(cast):
    char = cast.get("bolt_7")
    with pytest.raises(AttributeError):
        char.status = "fused"
    with pytest.raises(TypeError):
        cast.characters["bolt_7"] = char


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda m: [m], "manifest"),
        (lambda m: m["characters"][0].pop("card") and m, r"characters\[0\]\.card: Field required"),
        (lambda m: m["characters"][1].update(status="bogus") or m, r"characters\[1\]\.status"),
        (lambda m: m["characters"][0].update(key="../../x") or m, r"characters\[0\]\.key"),
        (lambda m: m["characters"].append(dict(m["characters"][0])) or m, "appears twice"),
        (lambda m: m["characters"][0]["card"].update(name=7) or m, r"characters\[0\]: name"),
        (lambda m: m["characters"][0].update(scope="guild:x") or m, "unknown scope"),
        (lambda m: m["characters"][0].update(fused_from={"nobody": 1.0}) or m, "not a trained"),
    ],
)
def test_a_hand_edited_manifest_is_refused_naming_the_field(cast, edit, error):
    path = cast.folder / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CatalogError, match=error):
        Catalog.open(cast.folder)


def test_block_files_are_never_followed_out_of_the_store(cast, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    path = cast.block_path("bolt_7")
    shutil.copy(path, outside)
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(CatalogError, match="symbolic link"):
        cast.block_path("bolt_7")


def test_an_event_that_contradicts_the_catalog_changes_nothing(cast):
    before = snapshot(cast)
    bad = [
        CatalogEvent(kind="added", key="g111.bolt_7", scope=A, card=card("Bolt 7").to_dict()),
        CatalogEvent(kind="trained", key="g111.x", scope=A, card={"name": "x"}),
        CatalogEvent(kind="added", key="bolt_7-2", scope=A, card=card("Zed").to_dict()),
    ]
    for event in bad:
        with pytest.raises(CatalogError):
            cast.apply(event)
    assert not cast.apply(CatalogEvent(kind="training", key="bolt_7"))  # trained stays trained
    assert snapshot(cast) == before
    new = CatalogEvent(kind="added", key="g111.zed", scope=A, card=card("Zed").to_dict())
    assert cast.apply(new)
    assert not cast.apply(new)
    assert cast.apply(CatalogEvent(kind="trained", key="g111.zed", scope=A))
    assert cast.get("g111.zed").status == "trained"


NAMES = [
    "Nami",
    "NAMI",
    "Námi",
    "Na-mi",
    "ＮＡＭＩ",
    "七海",
    "七 海",
    "Zoë",
    "Zoe",
    "Bolt 7",
    "Mara",
]


def test_random_operations_keep_every_invariant(cast):
    """Hundreds of random adds, trainings and removals from three scopes with colliding
    names: no action ever changes or removes a character it was not aimed at."""
    rng = random.Random(7)
    scopes = [A, B, LOCAL, SHARED]
    for _ in range(400):
        before = snapshot(cast)
        scope, op = rng.choice(scopes), rng.choice(["add", "add", "train", "remove"])
        target = None
        try:
            if op == "add":
                name = rng.choice(NAMES) + rng.choice(["", "", " II"])
                target = cast.add(card(name), scope, rng.choice(["fused", "trained"]), mix={}).key
            else:
                mine = [c for c in cast.visible(scope) if c.scope == scope]
                if not mine:
                    continue
                target = rng.choice(mine).key
                (cast.mark_trained if op == "train" else cast.remove)(target)
        except CatalogError:
            assert snapshot(cast) == before
            continue
        after = snapshot(cast)
        assert {k: v for k, v in before.items() if k != target} == {
            k: v for k, v in after.items() if k != target
        }
        for s in (A, B, LOCAL):
            names = [n for c in cast.visible(s) for n in c.names()]
            assert len(names) == len(set(names)), f"{s} sees one name twice"
            assert all(c.scope in (SHARED, s) for c in cast.visible(s))
    cast.save()
    assert snapshot(Catalog.open(cast.folder)) == snapshot(cast)
