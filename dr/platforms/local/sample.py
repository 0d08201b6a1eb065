"""A realistic sample database: the shape of a teacher-training application service.

Several tables with foreign keys and indexes, JSON, timestamps and numerics, and text
drawn from a vocabulary of a few thousand words with a Zipf-like frequency (a few common
words, a long tail of rare ones), so it compresses like prose: about 2.9:1 with gzip -6
and 2.4:1 with gzip -1, not 50:1 like pgbench data (a short word list drawn uniformly
would compress about 5:1 and flatter every compressor). Generated inside PostgreSQL with
a fixed seed, so the same size gives the same data.
"""

from __future__ import annotations

import json
import re

import psycopg

from dr.commands import ConnInfo
from dr.errors import InvalidInput

#: bytes of data per unit of scale, measured on PostgreSQL 18 with pg_database_size
#: (tables + indexes); `bench/recovery_speed.py` checks it
BYTES_PER_SCALE = 1_670_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS providers (
    id bigserial PRIMARY KEY,
    code text NOT NULL UNIQUE,
    name text NOT NULL,
    address jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS courses (
    id bigserial PRIMARY KEY,
    provider_id bigint NOT NULL REFERENCES providers(id),
    code text NOT NULL,
    title text NOT NULL,
    subject text NOT NULL,
    fee numeric(10,2) NOT NULL,
    starts_on date NOT NULL,
    UNIQUE (provider_id, code)
);
CREATE TABLE IF NOT EXISTS candidates (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    first_name text NOT NULL,
    last_name text NOT NULL,
    date_of_birth date NOT NULL,
    profile jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS applications (
    id bigserial PRIMARY KEY,
    candidate_id bigint NOT NULL REFERENCES candidates(id),
    course_id bigint NOT NULL REFERENCES courses(id),
    status text NOT NULL CHECK (status IN ('draft','submitted','offered','accepted','rejected','withdrawn')),
    personal_statement text NOT NULL,
    score numeric(5,2),
    submitted_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS applications_candidate_idx ON applications(candidate_id);
CREATE INDEX IF NOT EXISTS applications_course_idx ON applications(course_id);
CREATE INDEX IF NOT EXISTS applications_status_idx ON applications(status, updated_at);
CREATE TABLE IF NOT EXISTS audit_events (
    id bigserial PRIMARY KEY,
    application_id bigint REFERENCES applications(id),
    action text NOT NULL,
    changes jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS audit_events_created_idx ON audit_events(created_at);
"""

WORDS = (
    "teaching pupils school classroom subject degree experience learning children mathematics "
    "science english history geography physics chemistry biology language training mentor "
    "placement support reflect develop assessment curriculum lesson planning behaviour inclusion "
    "motivated passionate volunteer community leadership resilience feedback progress skills "
    "the and of to in a that with for as on my have this their our from which about when "
    "because during through while where would could should really always often also very"
).split()

#: syllables of the rare words of the vocabulary
SYLLABLES = (
    "ba be ca co de di en er es fo ga in la le li ma me mi mo na ne no pa pe pi po ra re ri ro sa se si so "
    "ta te ti to un ve vi al an ar at ed ing ion ous ment ly st tr pl str ch th sh"
).split()
#: the most frequent words, in rank order, before WORDS and the syllable-made tail
COMMON = "the and of to in a that with for as on my have this their our from which about when i it is was be by not or at an".split()
VOCABULARY_SIZE = 5000


def vocabulary(size: int = VOCABULARY_SIZE) -> list[str]:
    """Words by rank: common English words, the domain's words, then made-up words."""
    words = list(dict.fromkeys(COMMON + WORDS))
    seen = set(words)
    k = 0
    while len(words) < size:
        k += 1
        x = k * 2654435761 % 2**32  # a fixed hash of k: the same vocabulary every time
        w = "".join(SYLLABLES[(x >> (5 * j + 2)) % len(SYLLABLES)] for j in range(1 + x % 4))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


FIRST = "Amelia Olivia Isla Ava Mia Ivy Lily Freya Oliver George Noah Arthur Leo Harry Oscar Archie Jack Muhammad Priya Chen".split()
LAST = "Smith Jones Taylor Brown Williams Wilson Johnson Davies Patel Robinson Wright Thompson Evans Walker White Roberts Green Hall Khan Okafor".split()
SUBJECTS = "Mathematics Physics Chemistry Biology English History Geography Computing Music Art French Spanish".split()


def scale_for_size(size: str) -> int:
    """Scale factor for a size such as `small`, `100mb`, `1gb`."""
    s = size.strip().lower()
    if s == "small":
        return 1
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(mb|gb)", s)
    if not m:
        raise InvalidInput(f"unknown size {size!r}; use small, or a size such as 100mb, 1gb, 4gb")
    n = float(m.group(1)) * (1024 if m.group(2) == "gb" else 1)
    return max(1, round(n * 1024 * 1024 / BYTES_PER_SCALE))


def _arr(words: list[str]) -> str:
    return "ARRAY[" + ",".join("'" + w.replace("'", "''") + "'" for w in words) + "]"


def load_sample(conn: ConnInfo, scale: int = 1) -> dict[str, int]:
    """Create the schema and fill it; `scale` 1 is about 2 MB. Returns row counts."""
    vocab = vocabulary()
    words = json.dumps(vocab).replace("'", "''")
    first, last, subj = _arr(FIRST), _arr(LAST), _arr(SUBJECTS)
    n_prov, n_course, n_cand, n_app = 20 * scale, 100 * scale, 500 * scale, 1500 * scale
    with psycopg.connect(**conn.psycopg_kwargs(), autocommit=True) as c:
        c.execute(SCHEMA)
        if c.execute("SELECT count(*) FROM providers").fetchone()[0]:
            return table_counts(conn)
        with c.transaction():  # all or nothing: a half-loaded sample is never mistaken for a loaded one
            c.execute("SELECT setseed(0.42)")
            # the word of rank r is drawn with probability ~ 1/r (a log-uniform rank): Zipf's law, as
            # in prose; a jsonb array because its elements are reached directly (a text[] is walked)
            c.execute(f"""
                CREATE OR REPLACE FUNCTION pg_temp.prose(n int) RETURNS text LANGUAGE sql AS $$
                  SELECT string_agg(('{words}'::jsonb) ->> (floor(exp(random() * ln({len(vocab)})))::int - 1), ' ')
                  FROM generate_series(1, n) $$""")
            c.execute(f"""
                INSERT INTO providers (code, name, address)
                SELECT 'P' || lpad(i::text, 6, '0'), initcap(pg_temp.prose(3)) || ' Teaching School',
                       jsonb_build_object('line1', (1 + i % 200) || ' ' || initcap(pg_temp.prose(2)) || ' Road',
                                          'postcode', 'SW' || (1 + i % 20) || ' ' || (i % 10) || 'AB')
                FROM generate_series(1, {n_prov}) i""")
            c.execute(f"""
                INSERT INTO courses (provider_id, code, title, subject, fee, starts_on)
                SELECT 1 + (i % {n_prov}), 'C' || i, s || ' with QTS', s,
                       9250 + (i % 7) * 100, date '2027-09-01' + (i % 30)
                FROM generate_series(1, {n_course}) i, LATERAL (SELECT ({subj})[1 + i % {len(SUBJECTS)}] AS s) x""")
            c.execute(f"""
                INSERT INTO candidates (email, first_name, last_name, date_of_birth, profile, created_at)
                SELECT 'candidate' || i || '@example.org', ({first})[1 + i % {len(FIRST)}], ({last})[1 + (i / 7) % {len(LAST)}],
                       date '1970-01-01' + (i * 37) % 12000,
                       jsonb_build_object('phone', '07' || lpad((i::bigint * 7919 % 1000000000)::text, 9, '0'),
                                          'degree', pg_temp.prose(4), 'right_to_work', i % 9 <> 0),
                       timestamptz '2026-01-01' + make_interval(mins => i * 3)
                FROM generate_series(1, {n_cand}) i""")
            c.execute(f"""
                INSERT INTO applications (candidate_id, course_id, status, personal_statement, score, submitted_at, updated_at)
                SELECT 1 + (i % {n_cand}), 1 + (i * 13 % {n_course}),
                       (ARRAY['draft','submitted','offered','accepted','rejected','withdrawn'])[1 + i % 6],
                       pg_temp.prose(60 + (i % 80)), round((random() * 100)::numeric, 2),
                       timestamptz '2026-02-01' + make_interval(mins => i * 2),
                       timestamptz '2026-02-01' + make_interval(mins => i * 2 + 30)
                FROM generate_series(1, {n_app}) i""")
            c.execute(f"""
                INSERT INTO audit_events (application_id, action, changes, created_at)
                SELECT 1 + (i % {n_app}), (ARRAY['create','update','submit'])[1 + i % 3],
                       jsonb_build_object('field', 'status', 'note', pg_temp.prose(8)),
                       timestamptz '2026-02-01' + make_interval(mins => i)
                FROM generate_series(1, {n_app}) i""")
        c.execute("ANALYZE")
    return table_counts(conn)


def table_counts(conn: ConnInfo) -> dict[str, int]:
    """Exact row count of every user table, `schema.table` → rows."""
    from psycopg import sql

    with psycopg.connect(**conn.psycopg_kwargs(), autocommit=True) as c:
        tables = c.execute(
            "SELECT schemaname, relname FROM pg_stat_user_tables ORDER BY 1, 2").fetchall()
        return {
            f"{s}.{t}": c.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(s), sql.Identifier(t))).fetchone()[0]
            for s, t in tables
        }
