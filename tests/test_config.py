"""Run configs: TOML/YAML, overrides, relative paths, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowmodel.config import (
    DaskSection,
    RunConfig,
    config_from_dict,
    config_hash,
    load_config,
    parse_override,
)
from flowmodel.exceptions import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "scripts" / "examples").glob("*.[ty]*ml"))

MINIMAL = """\
[units]
path = "units.gpkg"
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    (tmp_path / "units.gpkg").write_bytes(b"x")
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults_and_absolute_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.units.path == tmp_path / "units.gpkg"
    assert cfg.out_dir == tmp_path / "runs" / "flowmodel-run"
    assert cfg.model.type == "gravity" and cfg.model.backend == "auto"
    assert cfg.predict.quantiles == [0.05, 0.25, 0.5, 0.75, 0.95]
    assert cfg.dask.cluster == "local"
    assert cfg.source == (tmp_path / "run.toml").resolve()


def test_relative_paths_resolve_against_config_folder_not_cwd(tmp_path: Path, monkeypatch) -> None:
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "data").mkdir()
    (sub / "data" / "u.gpkg").write_bytes(b"x")
    (sub / "run.toml").write_text(
        '[run]\nout_dir = "out"\n[units]\npath = "data/u.gpkg"\n[rasters]\npop = "/abs/p.tif"\n'
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/run.toml", check_files=False)
    assert cfg.units.path == sub / "data" / "u.gpkg"
    assert cfg.out_dir == sub / "out"
    assert cfg.rasters["pop"] == Path("/abs/p.tif")


def test_yaml_and_toml_examples_agree() -> None:
    toml = load_config(REPO / "scripts/examples/east_africa.toml", check_files=False)
    yaml = load_config(REPO / "scripts/examples/east_africa.yaml", check_files=False)
    assert toml.section_dict() == yaml.section_dict()
    assert len(toml.units.paths()) == 3
    assert toml.flows["cdr"].resolved_kind("cdr") == "cdr_od"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path: Path) -> None:
    cfg = load_config(path, check_files=False)
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize(
    ("item", "keys", "value"),
    [
        ("model.draws=500", ["model", "draws"], 500),
        ("model.type=radiation", ["model", "type"], "radiation"),
        ("evaluate.baselines=false", ["evaluate", "baselines"], False),
        ("predict.quantiles=[0.1, 0.9]", ["predict", "quantiles"], [0.1, 0.9]),
        ('run.name="a b"', ["run", "name"], "a b"),
        ("dask.memory_limit=4GB", ["dask", "memory_limit"], "4GB"),
        ("dask.walltime=02:00:00", ["dask", "walltime"], "02:00:00"),
        ("run.out_dir=/scratch/runs/x", ["run", "out_dir"], "/scratch/runs/x"),
    ],
)
def test_parse_override(item: str, keys: list[str], value: object) -> None:
    assert parse_override(item) == (keys, value)


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, MINIMAL), ["model.draws=50", "model.options.cost_func=exp", "run.seed=9"]
    )
    assert cfg.model.draws == 50
    assert cfg.model.options == {"cost_func": "exp"}
    assert cfg.run.seed == 9


@pytest.mark.parametrize("item", ["model.draws", "=3", "model..draws=3"])
def test_bad_override_syntax(tmp_path: Path, item: str) -> None:
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE with a dotted key"):
        load_config(write(tmp_path, MINIMAL), [item])


def test_override_into_a_value_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'model.draws' is a value, not a table"):
        load_config(write(tmp_path, MINIMAL), ["model.draws=3", "model.draws.x=1"])


# --------------------------------------------------------------- error messages
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[run]\nseed = 'abc'\n", r"run\.toml: \[run\] seed: expected an integer, got 'abc'"),
        ("[model]\ndraws = 1.5\n", r"\[model\] draws: expected an integer, got 1\.5"),
        (
            "[model]\ntype = 'gravty'\n",
            r"\[model\] type: expected one of 'gravity', 'radiation' or 'fusion', got 'gravty'",
        ),
        (
            "[model]\nconstraint = 'none'\n",
            r"\[model\] constraint: unknown key\. Fix: .*put model options under \[model\.options\]",
        ),
        ("[modle]\ntype = 'gravity'\n", r"modle: unknown key\. Fix: did you mean 'model'\?"),
        (
            "[predict]\nquantiles = [0.5, 1.5]\n",
            r"\[predict\] quantiles: quantiles must lie strictly between 0 and 1, got \[1\.5\]",
        ),
        ("[dask]\nwalltime = '2h'\n", r"\[dask\] walltime: walltime must look like HH:MM:SS"),
        (
            "[dask]\ncluster = 'pbs'\n",
            r"\[dask\] cluster: expected one of 'local', 'slurm' or 'none'",
        ),
        (
            "[report]\nenabled = 'maybe'\n",
            r"\[report\] enabled: expected true or false, got 'maybe'",
        ),
        (
            "[flows.cdr]\nkind = 'cdr_events'\npath = 'units.gpkg'\n",
            r"\[flows\] cdr: kind 'cdr_events' needs 'towers'",
        ),
        (
            "[evaluate]\nfolds = 1\n",
            r"\[evaluate\] folds: must be >= 2, got 1",
        ),
    ],
)
def test_invalid_values_name_file_key_expected_type(
    tmp_path: Path, extra: str, message: str
) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace("[units]", extra + "[units]")
        if extra.startswith("[model")
        else MINIMAL + extra,
    )
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "idfield = 'x'\n")
    with pytest.raises(
        ConfigError, match=r"\[units\] idfield: unknown key\. Fix: did you mean 'id_field'\?"
    ):
        load_config(path)


def test_missing_required_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[run]\nname = 'x'\n")
    with pytest.raises(ConfigError, match=r"run\.toml: units: required key is missing"):
        load_config(path)


def test_error_from_override_says_so(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"\[model\] draws: expected an integer, got 'many' \(set by --set\)"
    ):
        load_config(write(tmp_path, MINIMAL), ["model.draws=many"])


def test_all_errors_reported_on_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[model]\ndraws = 'x'\nchains = 'y'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "\n" not in text
    assert "[model] draws" in text and "[model] chains" in text


def test_missing_input_file_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[rasters]\npopulation = 'nope.tif'\n")
    with pytest.raises(
        ConfigError, match=r"input file\(s\) not found: rasters\.population = .*nope\.tif"
    ):
        load_config(path)
    assert load_config(path, check_files=False).rasters["population"].name == "nope.tif"


def test_missing_config_file_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "run.ini"
    bad.write_text("x")
    with pytest.raises(
        ConfigError,
        match=r"unknown config format '\.ini'. Fix: use a \.toml, \.yaml or \.yml file",
    ):
        load_config(bad)


def test_syntax_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.toml: not valid TOML: .*line 1"):
        load_config(write(tmp_path, "[units\npath = 1\n"))
    with pytest.raises(ConfigError, match=r"run\.yaml: not valid YAML"):
        load_config(write(tmp_path, "units: [a\n", name="run.yaml"))
    with pytest.raises(
        ConfigError, match=r"expected a mapping of sections at the top level, got list"
    ):
        load_config(write(tmp_path, "- a\n- b\n", name="list.yml"))


def test_yaml_config(tmp_path: Path) -> None:
    path = write(
        tmp_path, "units:\n  path: units.gpkg\nmodel:\n  type: radiation\n", name="run.yml"
    )
    cfg = load_config(path)
    assert cfg.model.type == "radiation"
    assert cfg.units.path == tmp_path / "units.gpkg"


def test_config_hash_is_stable_and_section_specific(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, MINIMAL))
    b = load_config(write(tmp_path, MINIMAL), ["model.draws=5"])
    assert config_hash(a, "units") == config_hash(b, "units")
    assert config_hash(a, "model") != config_hash(b, "model")
    assert len(config_hash(a)) == 16


def test_config_from_dict_and_dask_section() -> None:
    cfg = config_from_dict(
        {"units": {"path": "/x/u.gpkg"}, "dask": {"cluster": "slurm", "cores": 8}}
    )
    assert cfg.dask.cores == 8
    assert DaskSection().n_workers is None


# ------------------------------------------------------ deep validation (issue 18)
def test_reader_options_are_checked_against_the_reader(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("origin,destination,count\n")
    (tmp_path / "t.parquet").write_bytes(b"x")
    text = MINIMAL + '[flows.other]\npath = "t.csv"\noptions = { sepp = ";" }\n'
    with pytest.raises(
        ConfigError,
        match=r"\[flows\.other\.options\] sepp: unknown option of pandas\.read_csv "
        r"\(kind 'table'\)\. Fix: did you mean 'sep'\?",
    ):
        load_config(write(tmp_path, text))
    # read_parquet takes **kwargs: its options cannot be checked by name
    text = MINIMAL + '[flows.other]\npath = "t.parquet"\noptions = { columns = ["a"] }\n'
    assert load_config(write(tmp_path, text)).flows["other"].options == {"columns": ["a"]}


def test_estimates_options_are_checked_before_any_stage(tmp_path: Path) -> None:
    """kind = "estimates" has a reader like every other kind (its options were not checked)."""
    (tmp_path / "est.csv").write_text("origin,destination,estimate\nAAA,BBB,10\n")
    text = MINIMAL + '[flows.pub]\nkind = "estimates"\npath = "est.csv"\n'
    with pytest.raises(ConfigError, match=r"\[flows\.pub\.options\] rel_sdd: .*'rel_sd'"):
        load_config(write(tmp_path, text + "options = { rel_sdd = 0.1 }\n"))
    with pytest.raises(ConfigError, match=r"\[flows\.pub\.options\] rel_sd: expected float"):
        load_config(write(tmp_path, text + 'options = { rel_sd = "ten percent" }\n'))
    cfg = load_config(
        write(tmp_path, text + "options = { rel_sd = 0.1, origin_level = 'unit' }\n")
    )
    assert cfg.flows["pub"].options == {"rel_sd": 0.1, "origin_level": "unit"}


def test_option_typo_given_by_set_is_caught(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("origin,destination,count\n")
    path = write(tmp_path, MINIMAL + '[flows.census]\npath = "c.csv"\n')
    with pytest.raises(ConfigError, match=r"\[flows\.census\.options\] suppresed_min: .*"):
        load_config(path, ["flows.census.options.suppresed_min=1"])
    cfg = load_config(path, ["flows.census.options.suppresed_min=1"], deep=False)
    assert cfg.flows["census"].options == {"suppresed_min": 1}


def test_config_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    (tmp_path / "units.gpkg").write_bytes(b"x")
    path.write_bytes(("\ufeff" + MINIMAL).encode("utf-8"))
    assert load_config(path).units.path == tmp_path / "units.gpkg"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[run]\nname = "a b"\n', r"\[run\] name: 'a b' is not usable as a run name"),
        ('[run]\nname = "x/.."\n', r"\[run\] name: 'x/\.\.' is not usable"),
        ("[run]\nseed = 4294967296\n", r"\[run\] seed: must be <= 4294967295"),
        ("[model]\nchains = 1000\n", r"\[model\] chains: must be <= 64, got 1000"),
        ("[model]\ntune = 200000\n", r"\[model\] tune: must be <= 100000"),
        ('[rasters]\n"pop.v2" = "p.tif"\n', r"'pop\.v2' is not usable as a name in \[rasters\]"),
    ],
)
def test_names_and_bounds(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text + MINIMAL if text.startswith("[run]") else MINIMAL + text)
    if text.startswith("[model]"):
        path = write(tmp_path, text + MINIMAL)
    with pytest.raises(ConfigError, match=message):
        load_config(path, check_files=False)


def test_secret_option_values_are_never_shown(tmp_path: Path) -> None:
    (tmp_path / "e.parquet").write_bytes(b"x")
    (tmp_path / "t.csv").write_text("cell_id,lon,lat\n")
    text = MINIMAL + (
        '[flows.cdr]\nkind = "cdr_events"\npath = "e.parquet"\ntowers = "t.csv"\n'
        "options = { salt = [19870412] }\n"
    )
    with pytest.raises(
        ConfigError, match=r"\[flows\.cdr\.options\] salt: expected .*'<hidden>'"
    ) as info:
        load_config(write(tmp_path, text))
    assert "19870412" not in str(info.value)


def test_units_files_with_their_own_fields(tmp_path: Path) -> None:
    """Three offices, three schemas: each [units] path entry may set its own keys."""
    for name in ("ken.gpkg", "rwa.gpkg", "tza.gpkg"):
        (tmp_path / name).write_bytes(b"x")
    path = write(
        tmp_path,
        """\
[units]
id_field = "REG_ID"
country_field = "ISO"
path = [
  "ken.gpkg",
  { path = "rwa.gpkg", layer = "districts", id_field = "Dist_ID", country = "RWA", id_prefix = "RWA-" },
  { path = "tza.gpkg", id_field = "Region_Cod", country = "TZA", name_field = "Region_Nam", query = "Region_Cod < '51'" },
]
""",
    )
    cfg = load_config(path)
    ken, rwa, tza = cfg.units.files()
    assert ken == {
        "path": tmp_path / "ken.gpkg",
        "id_field": "REG_ID",
        "country_field": "ISO",
        "country": None,
        "layer": None,
        "name_field": None,
        "fields": [],
        "id_prefix": "",
        "query": None,
    }
    assert rwa["layer"] == "districts" and rwa["id_prefix"] == "RWA-"
    assert (rwa["id_field"], rwa["country_field"], rwa["country"]) == ("Dist_ID", None, "RWA")
    assert (tza["country"], tza["name_field"], tza["path"], tza["query"]) == (
        "TZA",
        "Region_Nam",
        tmp_path / "tza.gpkg",
        "Region_Cod < '51'",
    )
    assert list(cfg.input_files())[:3] == ["units.path[0]", "units.path[1]", "units.path[2]"]
    assert cfg.units.paths() == [tmp_path / n for n in ("ken.gpkg", "rwa.gpkg", "tza.gpkg")]


@pytest.mark.parametrize(
    ("units", "message"),
    [
        (
            'path = [{ path = "units.gpkg", idfield = "x" }]',
            r"\[units\.path\.0\] idfield: unknown key\. Fix: did you mean 'id_field'\?",
        ),
        (
            'path = [{ path = "units.gpkg", country = "TZA", country_field = "iso" }]',
            r"\[units\.path\] 0: give country .* or country_field .*, not both",
        ),
        (
            'path = "units.gpkg"\ncountry = "TZA"\ncountry_field = "iso"',
            r"units: give country .* or country_field .*, not both",
        ),
        ('path = [{ country = "TZA" }]', r"\[units\.path\.0\] path: required key is missing"),
        ("path = [3]", r"\[units\.path\] 0: expected a path \(string\), got 3"),
        ('path = [{ path = "nope.gpkg" }]', r"not found: units\.path\[0\] = .*nope\.gpkg"),
    ],
)
def test_units_entry_errors_name_the_entry(tmp_path: Path, units: str, message: str) -> None:
    path = write(tmp_path, f"[units]\n{units}\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "units-" not in str(info.value)  # pydantic's union tags stay hidden
