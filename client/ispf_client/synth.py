"""Synthetic registries with realistic CNICs and planted cross-province overlaps.

For demos and tests only. Every generated person has a distinct identity
number; `planted[(p, q)]` holds the numbers placed in both p's and q's
registries, which is exactly what a reconciliation of p and q must find.
Rows also include duplicates of an ID within a programme (several records of
one person) and invalid rows of each kind the loader must reject.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import combinations

from ispf.identity import KNOWN_PROVINCES

# A few district prefixes per province of issue (first five digits of a CNIC).
DISTRICTS: dict[str, tuple[str, ...]] = {
    "1": ("17301", "16101", "15602", "13503"),
    "2": ("21104", "21505"),
    "3": ("35202", "35201", "34101", "33100", "36302", "38403"),
    "4": ("42101", "42201", "41303", "45102", "43203"),
    "5": ("54400", "56302", "53101"),
    "6": ("61101",),
    "7": ("71501", "71103"),
    "8": ("81302", "82203"),
}
PROGRAMMES: dict[str, tuple[str, ...]] = {
    "punjab": ("BISP-KAFAALAT", "PSPA-HIMMAT", "PSER-SUPPORT"),
    "sindh": ("BISP-KAFAALAT", "SSPA-NASHONUMA", "SINDH-PEOPLES-SUPPORT"),
    "kp": ("BISP-KAFAALAT", "KP-SEHAT-CARD", "KP-EHSAAS-RASHAN"),
    "balochistan": ("BISP-KAFAALAT", "BSSF-INCOME", "BAL-HEALTH-CARD"),
    "islamabad": ("BISP-KAFAALAT", "ICT-WELFARE"),
    "gilgit-baltistan": ("BISP-KAFAALAT", "GB-SUPPORT"),
    "ajk": ("BISP-KAFAALAT", "AJK-ZAKAT"),
}
STATUSES = (("enrolled", 60), ("eligible", 25), ("suspended", 10), ("exited", 5))
INVALID_NIDS = (
    "3520212345",  # too short
    "35202-1234567-12",  # misplaced dash
    "3520A12345671",  # letter
    "9520212345671",  # unknown province digit
    "",  # empty
    "35202 1234567 1",  # spaces
)


@dataclass
class SyntheticFederation:
    rows: dict[str, list[tuple[str, str, str, str]]] = field(default_factory=dict)
    planted: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    invalid_rows: dict[str, int] = field(default_factory=dict)

    def csv_text(self, province: str) -> str:
        lines = ["record_id,cnic,programme,status"]
        lines += [",".join(r) for r in self.rows[province]]
        return "\n".join(lines) + "\n"


def _digit(province: str) -> str:
    return KNOWN_PROVINCES.get(province, "3")


def generate(
    provinces: list[str],
    records: int,
    seed: int = 1,
    overlap: float = 0.03,
    duplicates: float = 0.01,
    invalid: float = 0.004,
) -> SyntheticFederation:
    rng = random.Random(seed)
    used: set[str] = set()
    digits = sorted({_digit(p) for p in provinces} | {"2"})

    def new_id(home: str) -> str:
        while True:
            # Most people hold a CNIC of their home province; some moved.
            d = home if rng.random() < 0.85 else rng.choice(digits)
            nid = rng.choice(DISTRICTS[d]) + f"{rng.randrange(10**7):07d}" + str(rng.randrange(10))
            if nid not in used:
                used.add(nid)
                return nid

    def label(province: str) -> tuple[str, str]:
        prog = rng.choice(PROGRAMMES.get(province, ("BISP-KAFAALAT", "PROVINCIAL-SUPPORT")))
        status = rng.choices([s for s, _ in STATUSES], [w for _, w in STATUSES])[0]
        return prog, status

    people: dict[str, list[str]] = {p: [] for p in provinces}
    fed = SyntheticFederation()
    for p, q in combinations(provinces, 2):
        k = int(records * overlap * rng.uniform(0.3, 1.7))
        shared = {new_id(_digit(p)) for _ in range(k)}
        people[p].extend(shared)
        people[q].extend(shared)
        fed.planted[(p, q)] = set(shared)
    # A few people in three provinces at once (e.g. moved twice).
    for trio in combinations(provinces, 3):
        for _ in range(max(1, int(records * overlap / 10))):
            nid = new_id(_digit(trio[0]))
            for p in trio:
                people[p].append(nid)
            for a, b in combinations(trio, 2):
                fed.planted[(a, b)].add(nid)
    for p in provinces:
        while len(people[p]) < records:
            people[p].append(new_id(_digit(p)))
        rows: list[tuple[str, str, str, str]] = []
        code = p[:3].upper()
        for nid in people[p]:
            printed = f"{nid[:5]}-{nid[5:12]}-{nid[12]}" if rng.random() < 0.5 else nid
            rows.append((f"{code}-{len(rows) + 1:08d}", printed, *label(p)))
            if rng.random() < duplicates:  # a second record of the same person
                rows.append((f"{code}-{len(rows) + 1:08d}", nid, *label(p)))
        n_bad = max(1, int(records * invalid))
        for _ in range(n_bad):
            prog, status = label(p)
            rows.append((f"{code}-{len(rows) + 1:08d}", rng.choice(INVALID_NIDS), prog, status))
        rows.append((f"{code}-{len(rows) + 1:08d}", new_id(_digit(p)), "", "enrolled"))
        rng.shuffle(rows)
        fed.rows[p] = rows
        fed.invalid_rows[p] = n_bad + 1
    return fed
