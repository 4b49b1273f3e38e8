"""The demo seed: deterministic, realistic, atomic, and a larger scale is a superset of a smaller one."""

import datetime as dt

import psycopg
import pytest
from fibreflow.core import db
from fibreflow.core.errors import ConfigError
from fibreflow.datasets.seed import glossary_terms, load_seed_config, make_project, seed

pytestmark = pytest.mark.integration
SMALL = {"scale": 1, "projects_per_scale": 2, "seed": 7}
DIGEST = """SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {} t"""


def _digests(conn: psycopg.Connection) -> dict[str, str]:
    return {
        t: conn.execute(DIGEST.format(t)).fetchone()[0]
        for t in ("projects", "tasks", "boq_items", "poles", "daily_progress", "glossary")
    }


def _seeded(url: str, overrides: dict) -> dict[str, str]:
    with db.connect(url) as conn:
        db.migrate(conn)
        seed(conn, load_seed_config(overrides), progress=False)
        return _digests(conn)


def test_same_seed_same_data_across_servers(pg_url: str, pg15_url: str) -> None:
    assert _seeded(pg_url, SMALL) == _seeded(pg15_url, SMALL)


def test_reseeding_replaces_data_and_other_seed_differs(pg_url: str) -> None:
    first = _seeded(pg_url, SMALL)
    assert _seeded(pg_url, SMALL) == first  # idempotent, not appended
    other = _seeded(pg_url, {**SMALL, "seed": 8})
    assert other["projects"] != first["projects"]
    assert other["glossary"] == first["glossary"]


def test_larger_scale_is_a_superset(pg_url: str) -> None:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
        seed(conn, load_seed_config(SMALL), progress=False)
        small = set(conn.execute("SELECT p::text FROM poles p").fetchall())
        seed(conn, load_seed_config({**SMALL, "scale": 2}), progress=False)
        large = set(conn.execute("SELECT p::text FROM poles p").fetchall())
    assert small < large


def test_seeded_data_is_plausible(seeded_url: str) -> None:
    with db.connect(seeded_url) as conn:
        regions = {r[0] for r in conn.execute("SELECT region FROM projects")}
        assert regions <= {
            "Gauteng",
            "Western Cape",
            "KwaZulu-Natal",
            "Eastern Cape",
            "Free State",
            "Limpopo",
            "Mpumalanga",
            "North West",
            "Northern Cape",
        }
        lat, lon = conn.execute("SELECT min(latitude), max(longitude) FROM poles").fetchone()
        assert -35 < lat < -22 and 16 < lon < 33  # South Africa
        bad = conn.execute(
            "SELECT count(*) FROM daily_progress d JOIN projects p ON p.id = d.project_id "
            "WHERE d.report_date < p.start_date OR d.report_date > DATE '2026-10-31'"
        ).fetchone()[0]
        assert bad == 0
        assert conn.execute("SELECT count(*) FROM boq_items WHERE rate_zar <= 0").fetchone()[0] == 0
        units = {r[0] for r in conn.execute("SELECT DISTINCT unit FROM boq_items")}
        assert {"m", "each", "m²"} <= units


def test_glossary_has_the_core_terms() -> None:
    terms = {t["term"] for t in glossary_terms()}
    assert len(terms) >= 150
    for must in (
        "OTDR",
        "Splice closure",
        "Drop cable",
        "ONT",
        "OLT",
        "PON splitter",
        "FDP",
        "FDH",
        "Micro-duct",
        "Blown fibre",
        "Trenching",
        "Pole permissions",
        "As-built",
        "Homes passed",
        "Homes connected",
    ):
        assert must in terms
    assert all(len(t["definition"]) > 40 for t in glossary_terms())


def test_seed_refuses_unmigrated_db_and_writes_nothing(pg_url: str) -> None:
    from fibreflow.core.errors import SchemaMissing

    with db.connect(pg_url) as conn, pytest.raises(SchemaMissing):
        seed(conn, load_seed_config(SMALL), progress=False)


def test_failed_seed_rolls_back(seeded_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import fibreflow.datasets.seed as seed_mod

    def broken(*args, **kwargs):
        yield (
            1,
            "PRJ-9999",
            dt.date(2026, 1, 1),
            "crew",
            "trenching",
            -5,
            "m",
            None,
            "2026-01-01",
        )  # violates FK/CHECK

    monkeypatch.setitem(seed_mod.TABLES, "daily_progress", (seed_mod.TABLES["daily_progress"][0], broken))
    with db.connect(seeded_url) as conn:
        before = _digests(conn)
        with pytest.raises(psycopg.Error):
            seed(conn, load_seed_config({**SMALL, "seed": 99}), progress=False)
        assert _digests(conn) == before


def test_scale_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="scale"):
        load_seed_config({"scale": 0})


def test_project_generation_is_pure() -> None:
    a = make_project(42, 5, dt.date(2026, 10, 31))
    assert a == make_project(42, 5, dt.date(2026, 10, 31))
    assert a.start <= a.end


def test_data_the_seed_did_not_write_is_never_deleted_unless_asked(pg_url: str) -> None:
    """DATABASE_URL may name a company's Supabase: a seed there would truncate its projects."""
    from fibreflow.cli.main import app
    from fibreflow.datasets.seed import ForeignData
    from typer.testing import CliRunner

    with db.connect(pg_url) as conn:
        db.migrate(conn)
        conn.execute(
            "INSERT INTO projects (id, name, client, region, municipality, town, network_type, build_method, status,"
            " project_manager, start_date, target_end_date, homes_planned, budget_zar, updated_at) VALUES"
            " ('ACME-1', 'Real project', 'Client', 'Gauteng', 'City of Johannesburg', 'Soweto', 'FTTH', 'aerial',"
            " 'in_progress', 'Someone', '2026-01-01', '2026-12-31', 100, 1000000, now())"
        )
        with pytest.raises(ForeignData, match=r"holds rows the demo seed did not write \(projects 1\).*--replace-data"):
            seed(conn, load_seed_config(SMALL), progress=False)
        assert conn.execute("SELECT id FROM projects").fetchall() == [("ACME-1",)]  # nothing was changed
    result = CliRunner().invoke(app, ["db", "seed", "--set", "projects_per_scale=2"], env={"DATABASE_URL": pg_url})
    assert result.exit_code == 2 and "--replace-data" in result.output
    with db.connect(pg_url) as conn:
        seed(conn, load_seed_config(SMALL), progress=False, replace_data=True)
        assert conn.execute("SELECT count(*) FROM projects WHERE id = 'ACME-1'").fetchone()[0] == 0
        seed(conn, load_seed_config(SMALL), progress=False)  # its own data: replaced freely
        conn.execute("INSERT INTO glossary VALUES ('Added by hand', 'other', 'A term someone added.', '{}')")
        with pytest.raises(ForeignData, match=r"glossary"):  # rows added after seeding are not the seed's either
            seed(conn, load_seed_config(SMALL), progress=False)
