"""Amazon Reviews (2018 "amazon_v2" and 2023) -> RecBole atomic files ``<name>.inter`` and ``<name>.item``.

Inputs are the public gzip JSON-lines files of one category:

* 2018 (Ni et al.): reviews ``<Category>.json.gz`` (``reviewerID, asin, overall, unixReviewTime`` in s),
  metadata ``meta_<Category>.json.gz`` (``asin, title, brand, category, description, price``);
* 2023 (Hou et al.): reviews ``<Category>.jsonl.gz`` (``user_id, parent_asin, rating, timestamp`` in ms),
  metadata ``meta_<Category>.jsonl.gz`` (``parent_asin, title, store, categories, features,
  description, price``).

Processing order: parse (a malformed line stops with file and line number, or is counted and skipped
with ``skip_bad_lines``) -> keep ratings >= ``min_rating`` -> drop exact duplicate (user, item) reviews,
keeping the earliest -> optionally drop items without a title -> k-core (``user_k``, ``item_k``; iterated to
a fixed point, or ``k_core_passes`` passes) -> optionally keep each user's last ``last_n`` interactions (or
before the k-core: ``cap_first``) -> write, chronological per user. Text fields are cleaned (HTML entities
and tags, whitespace, tabs) and cut to ``max_text_chars``; otherwise they are kept as written (quotes too:
atomic files have no quoting).

:data:`RECIPES` hold each paper's filters (``prep amazon --recipe pad|faerec|hdrec|pte``), from the specs'
data sections, and :data:`PAPER_STATS` the statistics the papers report, printed beside ours.
"""
from __future__ import annotations

import ast
import gzip
import html
import json
import os
import re
import shutil
import urllib.request
from dataclasses import asdict, dataclass, field
from logging import getLogger
from typing import Dict, Iterator, List, Optional, Tuple

from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.files import atomic_write, temp_dir

#: Short dataset names used by the papers -> Amazon category file names.
CATEGORIES = {
    "pantry": "Prime_Pantry",
    "scientific": "Industrial_and_Scientific",
    "beauty": "All_Beauty",
    "instruments": "Musical_Instruments",
    "arts": "Arts_Crafts_and_Sewing",
    "games": "Video_Games",
    "office": "Office_Products",
    "toys": "Toys_and_Games",
    "sports": "Sports_and_Outdoors",
    "grocery": "Grocery_and_Gourmet_Food",
    "electronics": "Electronics",
    "movies": "Movies_and_TV",
    "cds": "CDs_and_Vinyl",
    "books": "Books",
    "home": "Home_and_Kitchen",
    "pets": "Pet_Supplies",
}

URLS = {
    "2018": ("https://jmcauley.ucsd.edu/data/amazon_v2/categoryFiles/{cat}.json.gz",
             "https://jmcauley.ucsd.edu/data/amazon_v2/metaFiles2/meta_{cat}.json.gz"),
    "2023": ("https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/review_categories/{cat}.jsonl.gz",
             "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/meta_categories/meta_{cat}.jsonl.gz"),
}

#: (user, item, rating, time, time divisor) review keys; item key of the metadata.
SCHEMA = {
    "2018": {"review": ("reviewerID", "asin", "overall", "unixReviewTime", 1), "meta_id": "asin"},
    "2023": {"review": ("user_id", "parent_asin", "rating", "timestamp", 1000), "meta_id": "parent_asin"},
}

ITEM_HEADER = "item_id:token\ttitle:token_seq\tbrand:token_seq\tcategories:token_seq\tdescription:token_seq\tprice:float"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_ID_BREAK = re.compile(r"[\t\r\n]+")  # in an id these would break the atomic row
_PRICE = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass
class AmazonOptions:
    version: str = "2018"
    min_rating: Optional[float] = None  # PAD: 4 (ratings > 3)
    user_k: int = 0
    item_k: int = 0
    k_core_passes: Optional[int] = None  # None: iterate to a fixed point; 1: LLM-ESR's single pass
    last_n: Optional[int] = None  # PAD: 23
    cap_first: bool = False  # keep the last ``last_n`` before the k-core (HDRec's order)
    drop_no_title: bool = False
    skip_bad_lines: bool = False
    max_text_chars: int = 2000


#: Each paper's Amazon preprocessing in one flag. ``source``: where each value comes from.
RECIPES: Dict[str, dict] = {
    "pad": {"options": {"min_rating": 4.0, "user_k": 5, "item_k": 0, "last_n": 23},
            "source": "PAD App. A (spec PAD 7.2): ratings > 3, users >= 5 (no item filter), each user's latest 23"},
    "faerec": {"options": {"user_k": 3, "item_k": 3, "k_core_passes": 1},
               "source": "FAERec code = LLM-ESR (spec FAERec 7.2): all ratings, one pass dropping users and items "
                         "with < 3 raw interactions"},
    "hdrec": {"options": {"drop_no_title": True, "last_n": 30, "cap_first": True, "user_k": 5, "item_k": 5},
              "source": "HDRec code + proposal (spec HDRec data): items with a title, each user's last 30 by time, "
                        "then users and items >= 5 iterated; start from the 5-core review file {stem}_5.json.gz"},
    "pte": {"options": {"user_k": 3, "item_k": 3, "k_core_passes": 1},
            "source": "PtE long-tail setting = LLM-ESR's data (spec PtE 7.2): all ratings, one 3/3 pass; the "
                      "cold-start setting's filters are not stated (spec PtE 7.1)"},
}

#: (recipe, short name) -> (users, items, interactions) the paper reports (its Table 1)
PAPER_STATS: Dict[Tuple[str, str], Tuple[int, int, int]] = {
    ("pad", "pantry"): (12871, 8347, 115004), ("pad", "electronics"): (598307, 423191, 5137265),
    ("faerec", "beauty"): (52204, 57289, 394908), ("faerec", "grocery"): (32126, 39264, 275256),
    ("hdrec", "arts"): (55490, 22303, 472676), ("hdrec", "scientific"): (10623, 4971, 73914),
    ("hdrec", "instruments"): (27321, 10360, 224680), ("hdrec", "pantry"): (14145, 4933, 130775),
    ("hdrec", "games"): (54721, 16835, 463840), ("pte", "beauty"): (52204, 57289, 394908),
}

#: the recipe a model's paper uses (the missing-dataset message proposes it)
MODEL_RECIPES = {"PAD": "pad", "FAERec": "faerec", "HDRec": "hdrec", "PtE": "pte"}


def prep_command(name: str, model: Optional[str], out: str) -> str:
    """The ``prep amazon`` command that makes dataset ``name`` under ``out`` (a known short name gets its
    category's 2018 file names; ``model`` its paper's recipe)."""
    category = CATEGORIES.get(name)
    files = (f"--reviews {category}.json.gz --meta meta_{category}.json.gz" if category
             else "--reviews REVIEWS.json.gz --meta META.json.gz")
    recipe = f" --recipe {MODEL_RECIPES[model]}" if model in MODEL_RECIPES else ""
    return f"recbole-llmfuse prep amazon --name {name}{recipe} {files} --out {out}"


@dataclass
class ConversionReport:
    name: str
    users: int
    items: int
    interactions: int
    bad_lines: Dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    items_without_title: int = 0
    items_dropped_no_title: int = 0
    merged_metadata: int = 0
    reviews_read: int = 0

    @property
    def density(self) -> float:
        return self.interactions / max(1, self.users * self.items)

    def table(self, paper: Optional[Tuple[int, int, int]] = None, paper_label: str = "paper") -> str:
        """A markdown table of the statistics (and the paper's own row when given), then the notes."""
        notes = [f"{self.reviews_read:,} reviews read", f"{sum(self.bad_lines.values()):,} malformed lines skipped",
                 f"{self.duplicates:,} duplicate reviews (earliest kept)",
                 f"{self.merged_metadata:,} repeated metadata records merged (first non-empty value per field)",
                 f"{self.items_without_title:,} items without a title"
                 + (f", {self.items_dropped_no_title:,} dropped (--drop_no_title)" if self.items_dropped_no_title else "")]
        return (
            "| dataset | users | items | interactions | density | avg. length |\n|---|---|---|---|---|---|\n"
            f"| {self.name} | {self.users:,} | {self.items:,} | {self.interactions:,} | {self.density:.4%} | "
            f"{self.interactions / max(1, self.users):.2f} |\n"
            + (f"| {paper_label} | {paper[0]:,} | {paper[1]:,} | {paper[2]:,} | "
               f"{paper[2] / max(1, paper[0] * paper[1]):.4%} | {paper[2] / max(1, paper[0]):.2f} |\n" if paper else "")
            + "; ".join(notes)
        )


def clean_text(value, limit: int) -> str:
    """Text of a metadata field (str or list of str): HTML unescaped, tags dropped, one line, cut to ``limit``."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(clean_text(v, limit) for v in value if v)
    text = html.unescape(_TAG.sub(" ", html.unescape(str(value))))
    text = _SPACE.sub(" ", text).strip()  # one line; quotes stay (atomic fields are literal)
    return text[:limit].rstrip()


def parse_price(value) -> str:
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, (int, float)):
        return str(float(value))
    match = _PRICE.search(str(value).replace(",", ""))
    return match.group(0) if match and "-" not in str(value).strip()[1:] else ""  # ranges like "$3 - $5": unknown


def read_json_lines(path: str, skip_bad_lines: bool, bad: Dict[str, int]) -> Iterator[dict]:
    """Records of a (gzip) JSON-lines file; Python-literal lines (older Amazon dumps) are accepted too."""
    import zlib

    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    with opener(path, "rt", encoding="utf-8") as f:
        lines = iter(f)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
            except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # a cut download: nothing after it is readable
                raise ConfigError(f"{path}: damaged or truncated gzip after line {lineno} ({err or type(err).__name__}); "
                                  f"fetch the file again (nothing was written)") from None
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path}, line {lineno + 1}: bytes that are not UTF-8 ({err.reason}); these files "
                                  f"are UTF-8 JSON lines: fetch the file again (nothing was written)") from None
            lineno += 1
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                try:
                    record = ast.literal_eval(line)
                    if isinstance(record, dict):
                        yield record
                        continue
                except (ValueError, SyntaxError):
                    pass
                if not skip_bad_lines:
                    raise ConfigError(
                        f"{path}, line {lineno}: not a JSON object ({line[:60]!r}...). Fix or remove the line, "
                        f"or pass --skip_bad_lines to skip and count such lines."
                    ) from None
                bad[path] = bad.get(path, 0) + 1


def _k_core(rows: List[tuple], user_k: int, item_k: int, passes: Optional[int] = None) -> List[tuple]:
    """Rows whose user has >= ``user_k`` and item >= ``item_k`` rows: iterated to a fixed point (``passes``
    None), or ``passes`` times (1: LLM-ESR's single pass over the raw counts)."""
    from collections import Counter

    done = 0
    while (user_k > 1 or item_k > 1) and (passes is None or done < passes):
        users, items = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= user_k and items[r[1]] >= item_k]
        done += 1
        if len(kept) == len(rows):
            break
        rows = kept
    return rows


def _last_n(rows: List[tuple], n: Optional[int]) -> List[tuple]:
    """Each user's last ``n`` rows in time (rows sorted by user, time, item; stable)."""
    rows = sorted(rows, key=lambda r: (r[0], r[3], r[1]))
    if not n:
        return rows
    by_user: Dict[str, List[tuple]] = {}
    for r in rows:
        by_user.setdefault(r[0], []).append(r)
    return [r for user_rows in by_user.values() for r in user_rows[-n:]]


#: beside the atomic files: the settings and statistics of the conversion that wrote them
RECORD_SUFFIX = "amazon.json"


def _settings(reviews: str, meta: Optional[str], options: AmazonOptions) -> dict:
    from dataclasses import asdict

    files = {k: {"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for k, p in (("reviews", reviews), ("meta", meta))
             if p}
    return {"options": asdict(options), "inputs": files}


def check_target(folder: str, name: str, settings: dict, force: bool) -> Optional[dict]:
    """Nothing there (None), or the same conversion made before (its record: nothing to do); anything else
    there is refused unless ``force``: a user's (perhaps hand-edited) dataset is never replaced silently."""
    present = [f"{name}.{s}" for s in ("inter", "item") if os.path.exists(os.path.join(folder, f"{name}.{s}"))]
    if not present or force:
        return None
    record = None
    try:
        with open(os.path.join(folder, f"{name}.{RECORD_SUFFIX}")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        pass
    if record and record.get("settings") == settings and all(
            record.get("sizes", {}).get(f) == os.path.getsize(os.path.join(folder, f)) for f in present):
        return record
    why = ("made by prep amazon with other settings or inputs" if record else "not made by prep amazon")
    raise ConfigError(f"{folder} already holds {', '.join(present)} ({why}); pass --force to replace them, or "
                      f"choose another --name or --out")


def convert(name: str, reviews: str, meta: Optional[str], out_dir: str, options: AmazonOptions,
            force: bool = False) -> ConversionReport:
    """Write ``<out_dir>/<name>/<name>.inter`` and ``.item`` (and ``<name>.amazon.json``, the settings); returns
    the statistics. An existing dataset there is refused unless ``force`` (see :func:`check_target`); the same
    conversion again returns the recorded statistics and writes nothing."""
    if options.version not in SCHEMA:
        raise ConfigError(f"version must be 2018 or 2023, not {options.version!r}")
    folder = os.path.join(out_dir, name)
    settings = _settings(reviews, meta, options)
    made = check_target(folder, name, settings, force)
    if made:
        getLogger().info(f"{folder}: made before with the same settings; nothing to do (--force to redo)")
        return ConversionReport(**made["report"])
    u_key, i_key, r_key, t_key, t_div = SCHEMA[options.version]["review"]
    bad: Dict[str, int] = {}
    rows, seen, duplicates, read = [], {}, 0, 0
    for lineno, rec in enumerate(read_json_lines(reviews, options.skip_bad_lines, bad), start=1):
        read = lineno
        try:
            user, item = _ID_BREAK.sub(" ", str(rec[u_key])), _ID_BREAK.sub(" ", str(rec[i_key]))
            rating, ts = float(rec[r_key]), int(rec[t_key]) // t_div
        except (KeyError, TypeError, ValueError) as err:
            if not options.skip_bad_lines:
                raise ConfigError(
                    f"{reviews}, record {lineno}: missing or invalid field ({err}); {options.version} reviews need "
                    f"{u_key}, {i_key}, {r_key}, {t_key}. Is --version right? (--skip_bad_lines skips such records)"
                ) from None
            bad[reviews] = bad.get(reviews, 0) + 1
            continue
        if options.min_rating is not None and rating < options.min_rating:
            continue
        key = (user, item)
        if key in seen:  # the same review twice (or re-reviews): keep the earliest
            duplicates += 1
            if ts < rows[seen[key]][3]:
                rows[seen[key]] = (user, item, rating, ts)
            continue
        seen[key] = len(rows)
        rows.append((user, item, rating, ts))

    if not rows:
        raise ConfigError(
            f"{reviews}: no review kept ({read} records read, {sum(bad.values())} malformed skipped"
            + (f", every one below --min_rating {options.min_rating}" if read and options.min_rating is not None else "")
            + f"). Is --version {options.version} right for this file? Nothing was written.")
    meta_rows: Dict[str, Tuple[str, ...]] = {}
    merged = 0
    if meta:
        m_id = SCHEMA[options.version]["meta_id"]
        lim = options.max_text_chars
        for rec in read_json_lines(meta, options.skip_bad_lines, bad):
            if m_id not in rec:
                continue
            if options.version == "2018":
                fields = (rec.get("title"), rec.get("brand"), rec.get("category"), rec.get("description"), rec.get("price"))
            else:
                fields = (rec.get("title"), rec.get("store"), rec.get("categories"),
                          [*(rec.get("features") or []), *(rec.get("description") or [])], rec.get("price"))
            title, brand, cats, desc, price = fields
            values = (clean_text(title, lim), clean_text(brand, lim), clean_text(cats, lim), clean_text(desc, lim),
                      parse_price(price))
            key = _ID_BREAK.sub(" ", str(rec[m_id]))
            if key in meta_rows:  # a repeated record: the first non-empty value of each field is kept
                merged += 1
                values = tuple(old or new for old, new in zip(meta_rows[key], values))
            meta_rows[key] = values
    no_title = {i for i in {r[1] for r in rows} if not meta_rows.get(i, ("",))[0]}
    if options.drop_no_title:
        rows = [r for r in rows if r[1] not in no_title]
    if options.cap_first:
        rows = _last_n(rows, options.last_n)
    rows = _k_core(rows, options.user_k, options.item_k, options.k_core_passes)
    if not rows:
        raise ConfigError(f"{reviews}: {read} records read, but the filters (--min_rating, --k_core, --drop_no_title) "
                          f"leave no interaction. Loosen them; nothing was written.")
    rows = _last_n(rows, None if options.cap_first else options.last_n)

    os.makedirs(folder, exist_ok=True)
    items = sorted({r[1] for r in rows})
    inter = [INTER_HEADER] + [f"{u}\t{i}\t{r:g}\t{t}" for u, i, r, t in rows]
    item = [ITEM_HEADER] + ["\t".join((i, *meta_rows.get(i, ("", "", "", "", "")))) for i in items]
    # both files are complete before either replaces an earlier conversion (other files in the folder stay)
    tmp = temp_dir(folder, f".{name}-")
    try:
        for suffix, lines in (("inter", inter), ("item", item)):
            atomic_write(os.path.join(tmp, f"{name}.{suffix}"), lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8")))
        report = ConversionReport(
            name=name, users=len({r[0] for r in rows}), items=len(items), interactions=len(rows), bad_lines=bad,
            duplicates=duplicates, items_without_title=len(no_title),
            items_dropped_no_title=len(no_title) if options.drop_no_title else 0, merged_metadata=merged,
            reviews_read=read)
        sizes = {f"{name}.{s}": os.path.getsize(os.path.join(tmp, f"{name}.{s}")) for s in ("inter", "item")}
        record = {"settings": settings, "sizes": sizes, "report": asdict(report)}
        atomic_write(os.path.join(tmp, f"{name}.{RECORD_SUFFIX}"),
                     lambda f: f.write(json.dumps(record, indent=1).encode("utf-8")))
        # the record last: a conversion cut between the renames is not taken for a finished one
        for fname in (f"{name}.inter", f"{name}.item", f"{name}.{RECORD_SUFFIX}"):
            os.replace(os.path.join(tmp, fname), os.path.join(folder, fname))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    getLogger().info("\n" + report.table())
    return report


def download(name: str, version: str, folder: str) -> Tuple[str, str]:
    """Fetch a category's review and metadata files (needs internet); returns their local paths."""
    from tqdm.auto import tqdm

    category = CATEGORIES.get(name, name)
    paths = []
    for url in (u.format(cat=category) for u in URLS[version]):
        path = os.path.join(folder, url.rsplit("/", 1)[1])
        if not os.path.exists(path):
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    total = int(resp.headers.get("Content-Length") or 0)
                    with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                        def write(f):
                            for block in iter(lambda: resp.read(1 << 20), b""):
                                f.write(block)
                                bar.update(len(block))
                        os.makedirs(folder, exist_ok=True)
                        atomic_write(path, write)
            except OSError as err:
                raise ConfigError(
                    f"could not download {url} ({err}). On an offline machine, fetch the two files elsewhere and "
                    f"pass --reviews and --meta."
                ) from None
        paths.append(path)
    return paths[0], paths[1]
