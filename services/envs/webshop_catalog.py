"""A small WebShop-compatible shop over a product catalogue this project generates.

WebShop itself (Yao et al., 2022) is not installable here (its code is on GitHub,
its 1.18M-product data on Google Drive). This module gives the WebShop adapter
something real to run against in CI: a deterministic catalogue (categories,
titles, prices, attributes, colour/size options), instructions built from a
target product, and a text site with WebShop's page flow and text conventions
(``[SEP]``-joined pages; ``search[query]`` and ``click[button]`` actions;
lower-cased clickables; search -> results (10 per page) -> item -> options /
description / features / reviews -> buy now).

The purchase reward follows the paper's formula
``r = r_type * (|U_att & Y_att| + |U_opt & Y_opt| + 1[price <= budget]) / (|U_att| + |U_opt| + 1)``,
with the type factor simplified to 1 for the instructed category and 0.1
otherwise, and exact (not fuzzy) attribute matching. The class exposes the
same methods the adapter calls on WebShop's ``WebAgentTextEnv``: ``reset(session)``,
``step(action)``, ``get_available_actions()``, ``get_instruction_text()``.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field

CATEGORIES = {
    "running shoes": ["breathable", "non slip", "lightweight", "arch support", "memory foam"],
    "rain jacket": ["waterproof", "hooded", "packable", "windproof", "machine washable"],
    "shampoo": ["sulfate free", "paraben free", "for dry hair", "natural ingredients", "long lasting"],
    "coffee mug": ["dishwasher safe", "microwave safe", "insulated", "lead free", "large capacity"],
    "phone case": ["shockproof", "slim fit", "wireless charging", "scratch resistant", "kickstand"],
    "desk lamp": ["dimmable", "usb charging", "eye caring", "touch control", "adjustable arm"],
    "yoga mat": ["non slip", "extra thick", "eco friendly", "with carrying strap", "sweat resistant"],
    "backpack": ["water resistant", "laptop compartment", "anti theft", "lightweight", "usb port"],
}
BRANDS = ["acme", "nordic", "zenith", "bluebird", "kestrel", "orchid", "summit", "harbor"]
COLORS = ["black", "white", "navy blue", "red", "grey", "green", "pink", "beige"]
SIZES = {"running shoes": ["7", "8", "9", "10", "11"], "rain jacket": ["small", "medium", "large", "x-large"],
         "yoga mat": ["68 inch", "72 inch"], "backpack": ["15 inch", "17 inch"]}
PAGE_SIZE = 10
_TOKEN = re.compile(r"[a-z0-9]+")


@dataclass
class Product:
    asin: str
    category: str
    title: str
    price: float
    attributes: list[str]
    options: dict[str, list[str]]


@dataclass
class Goal:
    asin: str
    category: str
    instruction: str
    attributes: list[str]
    options: dict[str, str]
    price_upper: float
    query: str


def build_catalog(seed: int = 0, n_products: int = 120, n_goals: int = 200) -> tuple[list[Product], list[Goal]]:
    """Deterministic products and shopping goals (one goal = one target product + constraints)."""
    rng = random.Random(seed)
    products, seen = [], set()
    for i in range(n_products):
        cat = list(CATEGORIES)[i % len(CATEGORIES)]
        attrs = sorted(rng.sample(CATEGORIES[cat], rng.randint(2, 4)))
        while True:
            asin = "B0" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(8))
            if asin not in seen:
                seen.add(asin)
                break
        opts = {"color": sorted(rng.sample(COLORS, rng.randint(2, 4)))}
        if cat in SIZES:
            opts["size"] = sorted(rng.sample(SIZES[cat], min(len(SIZES[cat]), rng.randint(2, 4))))
        title = f"{rng.choice(BRANDS).title()} {attrs[0]} {cat} with {attrs[-1]}, model {i:03d}"
        products.append(Product(asin, cat, title, round(rng.uniform(8, 120), 2), attrs, opts))
    goals = []
    for _ in range(n_goals):
        p = rng.choice(products)
        want_attrs = sorted(rng.sample(p.attributes, rng.randint(1, min(2, len(p.attributes)))))
        want_opts = {k: rng.choice(v) for k, v in p.options.items()}
        budget = math.ceil(p.price * rng.uniform(1.05, 1.6))
        opt_text = " and ".join(f"{k} {v}" for k, v in want_opts.items())
        text = (f"i need {' and '.join(want_attrs)} {p.category} in {opt_text}, "
                f"and price lower than {budget:.2f} dollars")
        goals.append(Goal(p.asin, p.category, text, want_attrs, want_opts, float(budget),
                          f"{' '.join(want_attrs)} {p.category}"))
    return products, goals


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass
class _Page:
    kind: str = "search"  # search | results | item | detail | done
    query: str = ""
    page: int = 1
    asin: str = ""
    chosen: dict[str, str] = field(default_factory=dict)
    detail: str = ""


class MiniShop:
    """WebShop's text-mode protocol over :func:`build_catalog`'s products."""

    def __init__(self, seed: int = 0, n_products: int = 120, n_goals: int = 200) -> None:
        self.products, self.goals = build_catalog(seed, n_products, n_goals)
        self.by_asin = {p.asin: p for p in self.products}
        self._docs = {p.asin: Counter(_tokens(f"{p.title} {' '.join(p.attributes)} {p.category}"))
                      for p in self.products}
        self._df = Counter(t for d in self._docs.values() for t in d)
        self.goal: Goal | None = None
        self.state = _Page()

    # ---------------------------------------------------------------- WebShop-compatible API

    def reset(self, session: int) -> tuple[str, None]:
        if not 0 <= int(session) < len(self.goals):
            raise ValueError(f"session {session} out of range [0, {len(self.goals)})")
        self.goal = self.goals[int(session)]
        self.state = _Page()
        return self._render(), None

    def get_instruction_text(self) -> str:
        return f"Instruction: [SEP] {self.goal.instruction}" if self.goal else ""

    def get_available_actions(self) -> dict:
        s = self.state
        if s.kind == "search":
            return {"has_search_bar": True, "clickables": ["search"]}
        if s.kind == "results":
            nav = ["back to search"] + (["< prev"] if s.page > 1 else [])
            nav += ["next >"] if s.page * PAGE_SIZE < len(self.search(s.query)) else []
            return {"has_search_bar": False, "clickables": nav + [a.lower() for a in self._page_asins()]}
        if s.kind == "item":
            p = self.by_asin[s.asin]
            values = [v for vs in p.options.values() for v in vs]
            return {"has_search_bar": False, "clickables": ["back to search", "< prev", *values,
                                                            "description", "features", "reviews", "buy now"]}
        if s.kind == "detail":
            return {"has_search_bar": False, "clickables": ["back to search", "< prev"]}
        return {"has_search_bar": False, "clickables": []}

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.goal is None:
            raise RuntimeError("step() before reset()")
        act = action.strip()
        m = re.fullmatch(r"(search|click)\[(.*)\]", act, flags=re.IGNORECASE | re.DOTALL)
        s = self.state
        if s.kind == "done" or m is None:
            return self._render(), 0.0, s.kind == "done", {}
        verb, arg = m.group(1).lower(), m.group(2).strip().lower()
        avail = self.get_available_actions()
        if verb == "search":
            if not avail["has_search_bar"] or not arg:
                return self._render(), 0.0, False, {}
            self.state = _Page("results", query=arg)
        elif arg not in avail["clickables"]:
            return self._render(), 0.0, False, {}
        elif arg == "back to search":
            self.state = _Page()
        elif arg == "next >":
            s.page += 1
        elif arg == "< prev":
            if s.kind == "results":
                s.page -= 1
            elif s.kind == "item":
                self.state = _Page("results", query=s.query, page=s.page)
            else:
                s.kind = "item"
        elif s.kind == "results":
            self.state = _Page("item", query=s.query, page=s.page, asin=arg.upper())
        elif arg in ("description", "features", "reviews"):
            s.kind, s.detail = "detail", arg
        elif arg == "buy now":
            reward = self.reward(s.asin, s.chosen)
            s.kind, s.detail = "done", f"{reward}"
            return self._render(), reward, True, {}
        else:  # an option value: select it within its option group
            p = self.by_asin[s.asin]
            group = next(k for k, vs in p.options.items() if arg in vs)
            s.chosen[group] = arg
        return self._render(), 0.0, False, {}

    # ---------------------------------------------------------------- shop logic

    def search(self, query: str) -> list[str]:
        """ASINs ranked by TF-IDF overlap with the query (ties by ASIN, so ranking is stable)."""
        q = _tokens(query)
        n = len(self._docs)

        def score(asin: str) -> float:
            d = self._docs[asin]
            return sum((1 + math.log(d[t])) * math.log(1 + n / self._df[t]) for t in q if d[t])

        ranked = sorted(self._docs, key=lambda a: (-score(a), a))
        return [a for a in ranked if score(a) > 0] or ranked

    def reward(self, asin: str, chosen: dict[str, str]) -> float:
        g, p = self.goal, self.by_asin[asin]
        att = sum(a in p.attributes for a in g.attributes)
        opt = sum(chosen.get(k) == v for k, v in g.options.items())
        price = 1 if p.price <= g.price_upper else 0
        r_type = 1.0 if p.category == g.category else 0.1
        return round(r_type * (att + opt + price) / (len(g.attributes) + len(g.options) + 1), 4)

    def expert(self, session: int) -> list[str]:
        """Search with the goal's query (the target's title if the query misses page 1), pick, buy."""
        g = self.goals[int(session)]
        query = g.query if g.asin in self.search(g.query)[:PAGE_SIZE] else self.by_asin[g.asin].title.lower()
        return [f"search[{query}]", f"click[{g.asin.lower()}]",
                *[f"click[{v}]" for v in g.options.values()], "click[buy now]"]

    def _page_asins(self) -> list[str]:
        s = self.state
        return self.search(s.query)[(s.page - 1) * PAGE_SIZE: s.page * PAGE_SIZE]

    def _render(self) -> str:
        s, instr = self.state, self.goal.instruction
        if s.kind == "search":
            return f"WebShop [SEP] Instruction: [SEP] {instr} [SEP] Search"
        head = f"Instruction: [SEP] {instr} [SEP] Back to Search"
        if s.kind == "results":
            total = len(self.search(s.query))
            parts = [head] + (["< Prev"] if s.page > 1 else []) + [f"Page {s.page} (Total results: {total})"]
            parts += ["Next >"] if s.page * PAGE_SIZE < total else []
            for a in self._page_asins():
                p = self.by_asin[a]
                parts += [a, p.title, f"${p.price:.2f}"]
            return " [SEP] ".join(parts)
        p = self.by_asin[s.asin] if s.asin else None
        if s.kind == "item":
            parts = [head, "< Prev"]
            for k, vs in p.options.items():
                parts += [k, *vs]
            parts += [p.title, f"Price: ${p.price:.2f}", "Rating: N.A.", "Description", "Features", "Reviews",
                      "Buy Now"]
            if s.chosen:
                parts.append("Selected: " + ", ".join(f"{k} {v}" for k, v in sorted(s.chosen.items())))
            return " [SEP] ".join(parts)
        if s.kind == "detail":
            body = {"description": f"{p.title}. A {p.category} that is {', '.join(p.attributes)}.",
                    "features": " [SEP] ".join(p.attributes),
                    "reviews": "No reviews yet."}[s.detail]
            return f"{head} [SEP] < Prev [SEP] {body}"
        return (f"Thank you for shopping with us! [SEP] Purchased [SEP] {s.asin} [SEP] "
                f"Your score (min 0.0, max 1.0) [SEP] {s.detail}")
