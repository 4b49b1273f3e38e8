"""Deterministic demo FibreFlow data, bulk-loaded with COPY in one transaction.

Every table's rows for project i come from `random.Random(f"{seed}:{i}:{table}")`, so the data is the same
on every machine and a larger scale is a superset of a smaller one.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml
from fibreflow.core.config import Strict, load_config
from fibreflow.core.db import check_schema, redact, table_counts
from fibreflow.core.errors import ConfigError, FibreFlowError
from tqdm import tqdm


class ForeignData(FibreFlowError):
    """The database holds data the demo seed did not write; seeding would delete it."""


# town -> (province, municipality, latitude, longitude)
TOWNS: dict[str, tuple[str, str, float, float]] = {
    "Soweto": ("Gauteng", "City of Johannesburg", -26.2485, 27.8540),
    "Randburg": ("Gauteng", "City of Johannesburg", -26.0936, 28.0064),
    "Midrand": ("Gauteng", "City of Johannesburg", -25.9992, 28.1263),
    "Centurion": ("Gauteng", "City of Tshwane", -25.8603, 28.1894),
    "Pretoria East": ("Gauteng", "City of Tshwane", -25.7863, 28.3200),
    "Benoni": ("Gauteng", "City of Ekurhuleni", -26.1885, 28.3208),
    "Germiston": ("Gauteng", "City of Ekurhuleni", -26.2178, 28.1672),
    "Khayelitsha": ("Western Cape", "City of Cape Town", -34.0403, 18.6779),
    "Bellville": ("Western Cape", "City of Cape Town", -33.9003, 18.6298),
    "Stellenbosch": ("Western Cape", "Stellenbosch Local Municipality", -33.9321, 18.8602),
    "Paarl": ("Western Cape", "Drakenstein Local Municipality", -33.7342, 18.9621),
    "George": ("Western Cape", "George Local Municipality", -33.9630, 22.4617),
    "Umhlanga": ("KwaZulu-Natal", "eThekwini Metropolitan", -29.7276, 31.0848),
    "Pinetown": ("KwaZulu-Natal", "eThekwini Metropolitan", -29.8170, 30.8570),
    "Pietermaritzburg": ("KwaZulu-Natal", "Msunduzi Local Municipality", -29.6006, 30.3794),
    "Gqeberha": ("Eastern Cape", "Nelson Mandela Bay", -33.9608, 25.6022),
    "East London": ("Eastern Cape", "Buffalo City", -33.0153, 27.9116),
    "Bloemfontein": ("Free State", "Mangaung Metropolitan", -29.0852, 26.1596),
    "Polokwane": ("Limpopo", "Polokwane Local Municipality", -23.9045, 29.4689),
    "Mbombela": ("Mpumalanga", "City of Mbombela", -25.4658, 30.9853),
    "Rustenburg": ("North West", "Rustenburg Local Municipality", -25.6676, 27.2421),
    "Potchefstroom": ("North West", "JB Marks Local Municipality", -26.7145, 27.0970),
    "Kimberley": ("Northern Cape", "Sol Plaatje Local Municipality", -28.7282, 24.7499),
}
CLIENTS = (
    "Ubuntu Fibre Networks",
    "Highveld Lightpath",
    "Coastal Connect FNO",
    "Baobab Broadband",
    "Protea Fibre",
    "Karoo Open Access",
)
MANAGERS = (
    "Thandi Nkosi",
    "Johan van der Merwe",
    "Aisha Patel",
    "Sipho Dlamini",
    "Lerato Mokoena",
    "Pieter Botha",
    "Nomvula Khumalo",
    "Ravi Naidoo",
    "Zanele Mthembu",
    "Craig Smith",
)
STREETS = (
    "Main Road",
    "Church Street",
    "Jacaranda Avenue",
    "Protea Street",
    "Mandela Drive",
    "Station Road",
    "Oak Avenue",
    "Voortrekker Road",
    "Umngeni Road",
    "Vilakazi Street",
    "Beach Road",
    "Kloof Street",
    "Sisulu Street",
    "Acacia Crescent",
    "Market Street",
    "Hospital Road",
    "School Lane",
    "Rivonia Road",
)
AREAS = (
    "North",
    "South",
    "East",
    "West",
    "Central",
    "Extension 2",
    "Extension 5",
    "Heights",
    "Park",
    "Gardens",
)
PROJECT_STATUSES = ("planning", "permits", "in_progress", "on_hold", "completed")

# phase -> task title templates
TASKS: dict[str, tuple[str, ...]] = {
    "design": (
        "Desktop survey of {area}",
        "Site survey walk-out on {street}",
        "Low-level design for FDH area {n}",
        "Splice plan for feeder cable {n}",
    ),
    "permits": (
        "Submit wayleave application to {municipality}",
        "Collect pole permissions on {street}",
        "Traffic management plan for {street} crossing",
        "Environmental sign-off for route section {n}",
    ),
    "civils": (
        "Trench route section {n} along {street}",
        "Directional drilling under {street}",
        "Install chambers on route section {n}",
        "Reinstatement of paving on {street}",
    ),
    "aerial": (
        "Plant poles on {street}",
        "Dress poles on route section {n}",
        "String ADSS cable along {street}",
    ),
    "cabling": ("Blow fibre into micro-ducts, section {n}", "Pull feeder cable from POP to FDH {n}"),
    "splicing": (
        "Splice closure at chamber {n}",
        "OTDR testing of feeder {n}",
        "Install splitters in FDH {n}",
    ),
    "connections": ("Home connections batch {n} on {street}", "Activate ONTs for batch {n}"),
    "close-out": ("Compile as-built for area {n}", "Clear snag list for {street}", "Submit handover pack"),
}
CREWS = (
    "Civils Crew A",
    "Civils Crew B",
    "Pole Crew 1",
    "Pole Crew 2",
    "Splicing Team 1",
    "Cabling Team",
    "Install Team North",
    "Install Team South",
)

# item_code, description, unit, rate range (ZAR), quantity per home planned
BOQ: tuple[tuple[str, str, str, float, float, float], ...] = (
    ("CIV-001", "Trenching 600 mm deep in soft soil incl. backfill and warning tape", "m", 85, 140, 6.0),
    ("CIV-002", "Trenching in hard rock", "m", 260, 420, 0.4),
    ("CIV-003", "Micro-trenching in road surface incl. sealing", "m", 120, 190, 1.2),
    ("CIV-004", "Horizontal directional drilling incl. 110 mm duct", "m", 420, 650, 0.3),
    ("CIV-005", "Supply and install 7/3.5 mm micro-duct bundle (12-way)", "m", 38, 62, 6.5),
    ("CIV-006", "Precast chamber incl. lid, installed", "each", 2800, 4200, 0.02),
    ("CIV-007", "Handhole at drop point, installed", "each", 650, 980, 0.08),
    ("CIV-008", "Reinstatement of paving", "m²", 210, 340, 0.5),
    ("CIV-009", "Reinstatement of tar surface", "m²", 380, 560, 0.15),
    ("AER-001", "Supply and plant 7 m treated wooden pole", "each", 1450, 1900, 0.25),
    ("AER-002", "Supply and plant 9 m treated wooden pole", "each", 1850, 2400, 0.05),
    ("AER-003", "Pole dressing hardware set (suspension and dead-end)", "each", 320, 480, 0.3),
    ("AER-004", "Stay wire assembly incl. anchor", "each", 750, 1100, 0.04),
    ("AER-005", "String and tension 24F ADSS cable", "m", 18, 29, 4.0),
    ("CAB-001", "Blow 24F micro-cable into micro-duct", "m", 14, 24, 5.5),
    ("CAB-002", "Pull 96F feeder cable in duct", "m", 22, 35, 1.0),
    ("SPL-001", "Fusion splice incl. protection sleeve", "each", 45, 75, 1.6),
    ("SPL-002", "Splice closure (dome, 96F) supply and install", "each", 3200, 4600, 0.02),
    ("SPL-003", "FDP (8-port) supply and install", "each", 1400, 2100, 0.125),
    ("SPL-004", "PON splitter 1:32 in FDH", "each", 900, 1350, 0.03),
    ("TST-001", "OTDR test, bidirectional, per fibre incl. trace", "each", 55, 90, 1.1),
    (
        "CON-001",
        "Home connection: drop cable, wall box, ONT install and light-level test",
        "each",
        1100,
        1650,
        0.45,
    ),
    ("CON-002", "Pre-connectorised drop cable 50 m", "each", 280, 390, 0.45),
    ("DOC-001", "As-built documentation per home passed", "each", 12, 22, 1.0),
    ("PM-001", "Site establishment and traffic management", "sum", 18000, 42000, 0.0),
)
# activity -> (unit, typical daily quantity range per crew)
ACTIVITIES: dict[str, tuple[str, float, float]] = {
    "trenching": ("m", 60, 240),
    "micro_trenching": ("m", 150, 450),
    "duct_installation": ("m", 120, 400),
    "pole_planting": ("poles", 4, 18),
    "cable_blowing": ("m", 400, 1800),
    "splicing": ("splices", 24, 140),
    "home_connections": ("homes", 3, 14),
}
NOTES = (
    None,
    None,
    None,
    "Rain stopped work after 14:00.",
    "TLB breakdown, waited two hours for a replacement.",
    "Hit unmarked water pipe, municipality notified.",
    "Waiting on homeowner pole permissions.",
    "Good progress, ahead of plan.",
    "Road crossing completed under traffic management.",
    "Load shedding delayed splicing at the FDH.",
    "Cable theft reported at chamber, SAPS case opened.",
    "Quality inspection passed with two snags.",
    "Rocky ground, switched to jackhammer.",
    "Short crew: two members off sick.",
    "Wayleave conditions require hand digging near gas line.",
)
POLE_TYPES = ("wood_7m", "wood_7m", "wood_7m", "wood_9m", "steel_7m")


class SeedConfig(Strict):
    scale: int
    seed: int
    projects_per_scale: int
    as_of: dt.date


def load_seed_config(overrides: dict[str, Any] | None = None) -> SeedConfig:
    cfg = load_config(SeedConfig, "seed", overrides)
    if cfg.scale < 1:
        raise ConfigError(f"seed.yaml: scale must be >= 1, got {cfg.scale}")
    return cfg


def glossary_terms() -> list[dict[str, Any]]:
    """The demo glossary shipped with the package (186 FibreFlow terms)."""
    text = (Path(__file__).with_name("demo") / "glossary.yaml").read_text()
    return yaml.safe_load(text)["terms"]


@dataclass(frozen=True)
class Project:
    index: int
    id: str
    name: str
    client: str
    town: str
    region: str
    municipality: str
    lat: float
    lon: float
    network_type: str
    build_method: str
    status: str
    manager: str
    start: dt.date
    end: dt.date
    homes: int
    budget: float
    progress: float  # fraction of the build done as of the as-of date


def make_project(seed: int, index: int, as_of: dt.date) -> Project:
    rng = random.Random(f"{seed}:{index}:project")
    town = rng.choice(sorted(TOWNS))
    region, municipality, lat, lon = TOWNS[town]
    network_type = rng.choices(("FTTH", "FTTB", "backbone"), weights=(80, 15, 5))[0]
    build_method = rng.choices(("underground", "aerial", "mixed"), weights=(45, 30, 25))[0]
    start = as_of - dt.timedelta(days=rng.randint(-45, 600))
    end = start + dt.timedelta(days=rng.randint(150, 420))
    elapsed = (as_of - start).days / max(1, (end - start).days)
    if elapsed < 0:
        status, progress = "planning", 0.0
    elif elapsed < 0.12:
        status, progress = "permits", 0.0
    elif elapsed >= 1.0 and rng.random() < 0.8:
        status, progress = "completed", 1.0
    else:
        status = "on_hold" if rng.random() < 0.1 else "in_progress"
        progress = min(0.97, max(0.05, elapsed * rng.uniform(0.7, 1.05)))
    homes = rng.randint(300, 2600) if network_type != "backbone" else rng.randint(0, 40)
    phase = rng.randint(1, 4)
    return Project(
        index=index,
        id=f"PRJ-{index + 1:04d}",
        name=f"{town} {rng.choice(AREAS)} {network_type} Phase {phase}",
        client=rng.choice(CLIENTS),
        town=town,
        region=region,
        municipality=municipality,
        lat=lat,
        lon=lon,
        network_type=network_type,
        build_method=build_method,
        status=status,
        manager=rng.choice(MANAGERS),
        start=start,
        end=end,
        homes=homes,
        budget=round(homes * rng.uniform(5200, 8900) + 250_000, 2),
        progress=progress,
    )


def _stamp(day: dt.date) -> str:
    return f"{day.isoformat()} 17:00:00+02"


def project_rows(p: Project, as_of: dt.date) -> tuple[Any, ...]:
    return (
        p.id,
        p.name,
        p.client,
        p.region,
        p.municipality,
        p.town,
        p.network_type,
        p.build_method,
        p.status,
        p.manager,
        p.start,
        p.end,
        p.homes,
        p.budget,
        _stamp(min(as_of, p.end)),
    )


def task_rows(p: Project, seed: int, as_of: dt.date) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(f"{seed}:{p.index}:tasks")
    phases = list(TASKS)
    span = (p.end - p.start).days
    for j in range(30):
        phase = phases[min(len(phases) - 1, j * len(phases) // 30)]
        title = rng.choice(TASKS[phase]).format(
            area=p.town, street=rng.choice(STREETS), n=rng.randint(1, 12), municipality=p.municipality
        )
        due = p.start + dt.timedelta(days=int(span * (j + 1) / 31))
        frac = (j + 0.5) / 30
        if frac <= p.progress - 0.05:
            status, done_on = "done", min(as_of, due + dt.timedelta(days=rng.randint(-10, 12)))
        elif frac <= p.progress + 0.1 and p.status in ("in_progress", "on_hold"):
            status, done_on = (
                ("blocked" if p.status == "on_hold" or rng.random() < 0.15 else "in_progress"),
                None,
            )
        else:
            status, done_on = "todo", None
        assignee = rng.choice((*CREWS, p.manager)) if status != "todo" or rng.random() < 0.5 else None
        yield (p.index * 100 + j, p.id, phase, title, status, assignee, due, done_on, _stamp(min(as_of, due)))


def boq_rows(p: Project, seed: int, as_of: dt.date) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(f"{seed}:{p.index}:boq")
    for j, (code, desc, unit, lo, hi, per_home) in enumerate(BOQ):
        qty = 1.0 if unit == "sum" else round(max(1.0, p.homes * per_home * rng.uniform(0.8, 1.25)), 0)
        if unit == "m²" or unit == "m":
            qty = round(qty * rng.uniform(0.95, 1.05), 1)
        yield (p.index * 100 + j, p.id, code, desc, unit, qty, round(rng.uniform(lo, hi), 2), _stamp(p.start))


def pole_rows(p: Project, seed: int, as_of: dt.date) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(f"{seed}:{p.index}:poles")
    n = rng.randint(220, 380) if p.build_method != "underground" else rng.randint(200, 300)
    for j in range(n):
        planted = None
        r = rng.random()
        if p.status == "planning":
            status = "planned"
        elif r < p.progress * 0.9:
            status = "dressed" if rng.random() < 0.7 else "planted"
            planted = min(as_of, p.start + dt.timedelta(days=int((p.end - p.start).days * r)))
        elif r < 0.97:
            status = rng.choices(("planned", "permission_pending", "permission_granted"), weights=(3, 4, 3))[0]
        else:
            status = "rejected"
        # scattered around the town centre: sigma 0.012 deg ~ 1.3 km (1 deg latitude ~ 111 km)
        lat = p.lat + rng.gauss(0, 0.012)
        lon = p.lon + rng.gauss(0, 0.012)
        yield (
            p.index * 1000 + j,
            p.id,
            f"{p.id[4:]}-P{j + 1:04d}",
            round(lat, 6),
            round(lon, 6),
            rng.choice(POLE_TYPES),
            status,
            rng.choice(STREETS),
            planted,
            _stamp(planted or p.start),
        )


# Which activities run in which part of a build (fraction of the way from start to target end).
STAGE_ACTIVITIES = (
    (0.35, ("trenching", "micro_trenching", "duct_installation", "pole_planting")),
    (0.65, ("trenching", "duct_installation", "pole_planting", "cable_blowing", "splicing")),
    (1.01, ("cable_blowing", "splicing", "home_connections", "duct_installation")),
)


def progress_rows(p: Project, seed: int, as_of: dt.date) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(f"{seed}:{p.index}:daily_progress")
    if p.progress <= 0:
        return
    excluded = {"underground": {"pole_planting"}, "aerial": {"trenching", "micro_trenching"}}.get(p.build_method, set())
    span = max(1, (p.end - p.start).days)
    last = min(as_of, p.end)
    day, j = p.start + dt.timedelta(days=7), 0
    while day <= last and j < 9990:
        if day.weekday() < 5 or (day.weekday() == 5 and rng.random() < 0.3):  # weekdays, some Saturdays
            stage = next(acts for upto, acts in STAGE_ACTIVITIES if (day - p.start).days / span < upto)
            activities = [a for a in stage if a not in excluded]
            crews = rng.sample(CREWS, k=rng.randint(1, 2))
            for activity in activities:
                for crew in crews if rng.random() < 0.65 else crews[:1]:
                    unit, lo, hi = ACTIVITIES[activity]
                    qty = round(rng.uniform(lo, hi), 1) if unit == "m" else float(rng.randint(int(lo), int(hi)))
                    yield (
                        p.index * 10000 + j,
                        p.id,
                        day,
                        crew,
                        activity,
                        qty,
                        unit,
                        rng.choice(NOTES),
                        _stamp(day),
                    )
                    j += 1
        day += dt.timedelta(days=1)


TABLES = {  # table -> (columns, row generator); COPY order respects foreign keys
    "tasks": (
        "id, project_id, phase, title, status, assignee, due_date, completed_on, updated_at",
        task_rows,
    ),
    "boq_items": ("id, project_id, item_code, description, unit, quantity, rate_zar, updated_at", boq_rows),
    "poles": (
        "id, project_id, pole_number, latitude, longitude, pole_type, status, street, planted_on, updated_at",
        pole_rows,
    ),
    "daily_progress": (
        "id, project_id, report_date, crew, activity, quantity, unit, notes, updated_at",
        progress_rows,
    ),
}
PROJECT_COLUMNS = (
    "id, name, client, region, municipality, town, network_type, build_method, status,"
    " project_manager, start_date, target_end_date, homes_planned, budget_zar, updated_at"
)


def foreign_rows(conn: psycopg.Connection) -> dict[str, int]:
    """Rows the demo seed did not write: every row when the data came from elsewhere (a Supabase sync, a company
    database), else the tables whose counts differ from what the seed recorded. Empty: safe to replace."""
    counts = table_counts(conn)
    meta = conn.execute("SELECT value FROM fibreflow_meta WHERE key = 'data_source'").fetchone()
    written = meta[0].get("rows", {}) if meta and meta[0].get("source") == "demo-seed" else {}
    return {t: n for t, n in counts.items() if t != "fibreflow_meta" and n and n != written.get(t)}


def seed(
    conn: psycopg.Connection, cfg: SeedConfig, *, progress: bool = True, replace_data: bool = False
) -> dict[str, int]:
    """Replace all FibreFlow data with the demo data for `cfg`, atomically. Returns rows per table.

    A database holding rows the seed did not write (`DATABASE_URL` may name a company's Supabase) is refused
    unless `replace_data`: nothing is deleted then."""
    check_schema(conn)
    projects = [make_project(cfg.seed, i, cfg.as_of) for i in range(cfg.scale * cfg.projects_per_scale)]
    counts: dict[str, int] = {}
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("LOCK projects, tasks, boq_items, poles, daily_progress, glossary, fibreflow_meta")
        if not replace_data and (found := foreign_rows(conn)):
            rows = ", ".join(f"{t} {n}" for t, n in found.items())
            raise ForeignData(
                f"{redact(conn.info.dsn)} holds rows the demo seed did not write ({rows}); nothing was changed. "
                "Seeding deletes them: pass --replace-data if that is what you want, or unset DATABASE_URL to "
                "seed the embedded database"
            )
        cur.execute("TRUNCATE projects, tasks, boq_items, poles, daily_progress, glossary, fibreflow_meta")
        with cur.copy("COPY glossary (term, category, definition, aliases) FROM STDIN") as copy:
            terms = glossary_terms()
            for t in terms:
                copy.write_row((t["term"], t["category"], t["definition"], t["aliases"]))
        counts["glossary"] = len(terms)
        with cur.copy(f"COPY projects ({PROJECT_COLUMNS}) FROM STDIN") as copy:
            for p in projects:
                copy.write_row(project_rows(p, cfg.as_of))
        counts["projects"] = len(projects)
        for table, (columns, rows) in TABLES.items():
            n = 0
            with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for p in tqdm(projects, desc=f"seed {table}", unit="project", disable=not progress, leave=False):
                    for row in rows(p, cfg.seed, cfg.as_of):
                        copy.write_row(row)
                        n += 1
            counts[table] = n
        meta = {
            "source": "demo-seed",
            "scale": cfg.scale,
            "seed": cfg.seed,
            "as_of": cfg.as_of.isoformat(),
            "projects_per_scale": cfg.projects_per_scale,
            "rows": counts,
        }
        cur.execute("INSERT INTO fibreflow_meta (key, value) VALUES ('data_source', %s)", (json.dumps(meta),))
        cur.execute("ANALYZE")
    return counts
