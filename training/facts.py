"""Synthetic facts about fictional people: documents in varied English templates and questions.

Every entity is generated from a seeded ``random.Random``: an invented name, and six attributes
drawn from large sets (so guessing an answer has a small chance):

    city     invented town names (syllables + suffix, ~19k)    "Tamsbury"
    job      59 professions                                     "carpenter"
    year     1700-2099                                          "1843"
    colour   24 colours                                         "teal"
    number   10-999                                             "417"
    pet      invented two-syllable names (~1.6k)                "Brisko"

A document states 3-5 of them about one person (``document``), or several people in a row
(``multi_document``). A question asks for one stated attribute in the base-model format

    Question: What city does Orlan Vesk live in?\nAnswer:      ->  " Tamsbury\n"

Training (``training/train.py``), the benchmark (``bench/memory_qa.py``) and the checkpoint test
use this one module, with different seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYLLABLES = [
    "ka",
    "ren",
    "to",
    "mi",
    "vel",
    "dor",
    "an",
    "sa",
    "bri",
    "lo",
    "than",
    "qui",
    "mar",
    "el",
    "os",
    "tir",
    "un",
    "ga",
    "fen",
    "ro",
    "li",
    "ve",
    "nor",
    "cas",
    "di",
    "pel",
    "ash",
    "mo",
    "wen",
    "zu",
    "hal",
    "is",
    "ber",
    "cy",
    "jor",
    "ta",
    "vin",
    "eth",
    "ul",
    "sar",
]
CITY_SUFFIXES = ["bury", "ford", "holm", "wick", "ton", "vale", "mouth", "stead", "port", "field", "gate", "moor"]
JOBS = [
    "baker",
    "carpenter",
    "nurse",
    "pilot",
    "teacher",
    "farmer",
    "painter",
    "sailor",
    "doctor",
    "lawyer",
    "engineer",
    "architect",
    "butcher",
    "tailor",
    "potter",
    "weaver",
    "miner",
    "fisherman",
    "gardener",
    "librarian",
    "chemist",
    "dentist",
    "jeweller",
    "blacksmith",
    "musician",
    "singer",
    "dancer",
    "poet",
    "writer",
    "journalist",
    "banker",
    "merchant",
    "shepherd",
    "hunter",
    "soldier",
    "judge",
    "priest",
    "cook",
    "waiter",
    "barber",
    "mechanic",
    "plumber",
    "electrician",
    "surgeon",
    "pharmacist",
    "astronomer",
    "geologist",
    "historian",
    "photographer",
    "sculptor",
    "translator",
    "clerk",
    "glassblower",
    "brewer",
    "beekeeper",
    "locksmith",
    "watchmaker",
    "bookbinder",
    "cartographer",
]
COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "violet",
    "crimson",
    "teal",
    "amber",
    "indigo",
    "scarlet",
    "turquoise",
    "beige",
    "maroon",
    "olive",
    "navy",
    "silver",
    "gold",
]
ATTRIBUTES = ("city", "job", "year", "colour", "number", "pet")

# Statements: {s} subject at the start of a sentence (name or pronoun), {p} its possessive,
# {n} the name where a pronoun would not read (mid-sentence), {v} the value, {a} "a"/"an".
STATEMENTS = {
    "city": [
        "{s} lives in {v}.",
        "{s} has a house in {v}.",
        "{s} moved to {v} years ago.",
        "The home of {n} is in {v}.",
        "{s} lives in the town of {v}.",
    ],
    "job": [
        "{s} works as {a} {v}.",
        "{s} is {a} {v} by trade.",
        "By profession, {n} is {a} {v}.",
        "{s} earns a living as {a} {v}.",
    ],
    "year": [
        "{s} was born in {v}.",
        "{s} came into the world in {v}.",
        "The birth year of {n} is {v}.",
        "{p} birth was in the year {v}.",
    ],
    "colour": [
        "{p} favourite colour is {v}.",
        "{s} likes the colour {v} best.",
        "Of all colours, {n} prefers {v}.",
        "The favourite colour of {n} is {v}.",
    ],
    "number": [
        "{p} lucky number is {v}.",
        "{s} always picks the number {v}.",
        "The lucky number of {n} is {v}.",
        "{s} believes that {v} is a lucky number.",
    ],
    "pet": [
        "{s} has a dog named {v}.",
        "{p} dog is called {v}.",
        "The dog of {n} answers to {v}.",
        "{s} walks a dog called {v} every morning.",
    ],
}
# NAMING "after": every sentence gives the value first (as the answer spells it: lower-case words
# never start a sentence) and ends with the person's full name, so
# the memory rows of the name (whose keys carry who, from the tokens themselves) come after the
# fact they can carry in their values, which a causal forward over the document lets them read.
STATEMENTS_AFTER = {
    "city": [
        "{v} is the home town of {n}.",
        "The town of {v} is home to {n}.",
        "A house in {v} belongs to {n}.",
    ],
    "job": [
        "Working as {a} {v} is the trade of {n}.",
        "The profession of {a} {v} is that of {n}.",
        "The job of {a} {v} is done by {n}.",
    ],
    "year": [
        "{v} is the birth year of {n}.",
        "The year {v} saw the birth of {n}.",
        "In {v} was born {n}.",
    ],
    "colour": [
        "The colour {v} is liked best by {n}.",
        "Of all colours, {v} is the favourite of {n}.",
    ],
    "number": [
        "{v} is the lucky number of {n}.",
        "The number {v} brings luck to {n}.",
    ],
    "pet": [
        "{v} is the dog of {n}.",
        "A dog called {v} is walked every morning by {n}.",
    ],
}
QUESTIONS = {
    "city": ["What city does {n} live in?", "Where does {n} live?", "In which town does {n} live?"],
    "job": ["What is the profession of {n}?", "What does {n} do for a living?", "What job does {n} have?"],
    "year": ["In what year was {n} born?", "When was {n} born?", "What is the birth year of {n}?"],
    "colour": ["What is the favourite colour of {n}?", "Which colour does {n} like best?"],
    "number": ["What is the lucky number of {n}?", "Which number does {n} consider lucky?"],
    "pet": ["What is the name of the dog of {n}?", "What is the dog of {n} called?"],
}
INTROS = ["", "", "This note is about {n}.", "Here are some facts about {n}.", "Let me tell you about {n}."]


@dataclass
class Entity:
    first: str
    last: str
    gender: str  # "he" / "she": pronouns in documents
    attrs: dict

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class QA:
    question: str  # "Question: ...?\nAnswer:"
    answer: str  # " value" (what the model must generate before the newline)
    entity: Entity
    attribute: str


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


def make_entity(rng: random.Random) -> Entity:
    attrs = {
        "city": _word(rng, 2) + rng.choice(CITY_SUFFIXES),
        "job": rng.choice(JOBS),
        "year": str(rng.randint(1700, 2099)),
        "colour": rng.choice(COLOURS),
        "number": str(rng.randint(10, 999)),
        "pet": _word(rng, 2),
    }
    return Entity(_word(rng, 2), _word(rng, rng.choice((2, 2, 3))), rng.choice(("he", "she")), attrs)


def make_entities(rng: random.Random, n: int) -> list[Entity]:
    """``n`` entities with distinct full names."""
    out, seen = [], set()
    while len(out) < n:
        e = make_entity(rng)
        if e.name not in seen:
            seen.add(e.name)
            out.append(e)
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# "varied": a paragraph names its person in full first, then by full name, first name or pronoun;
# "named": every sentence names the person in full (the subject sits next to each fact);
# "after": every sentence states the value, then names the person in full (STATEMENTS_AFTER).
NAMING = "varied"
NAMINGS = ("varied", "named", "after")


def _sentence(rng: random.Random, e: Entity, attr: str, first: bool) -> str:
    if NAMING == "after":
        v = e.attrs[attr]
        template = rng.choice(STATEMENTS_AFTER[attr])
        return template.format(n=e.name, v=v, a=_article(v))
    template = rng.choice(STATEMENTS[attr])
    # The first mention is always the full name; later ones vary (full, first name, pronoun).
    form = "full" if first or NAMING == "named" else rng.choice(("full", "first", "pronoun"))
    name = e.name if form == "full" else e.first
    subj = name if form != "pronoun" else e.gender.capitalize()
    poss = f"{name}'s" if form != "pronoun" else ("His" if e.gender == "he" else "Her")
    v = e.attrs[attr]
    return template.format(s=subj, p=poss, n=name, v=v, a=_article(v))


def document(rng: random.Random, e: Entity, n_facts: int | None = None) -> tuple[str, list[str]]:
    """-> (text, the attributes it states, in order). States 3-5 attributes of ``e``."""
    attrs = rng.sample(ATTRIBUTES, n_facts or rng.randint(3, 5))
    intro = rng.choice(INTROS).format(n=e.name)
    parts = [intro] if intro else []
    for i, a in enumerate(attrs):
        parts.append(_sentence(rng, e, a, first=(i == 0 and not intro)))
    return " ".join(parts), attrs


def multi_document(rng: random.Random, entities: list[Entity]) -> tuple[str, list[list[str]]]:
    """Several people's paragraphs in one text (newline-separated). -> (text, attributes per entity)."""
    texts, attrs = zip(*(document(rng, e) for e in entities))
    return "\n".join(texts), list(attrs)


def answer_span(doc: str, e: Entity, attr: str) -> tuple[int, int]:
    """Character range [lo, hi) of the sentence of ``doc`` (from ``document``/``multi_document``)
    that states ``e``'s ``attr``: searched in ``e``'s paragraph, whose first sentence names them
    in full. -> (0, 0) when not found."""
    start = 0
    for para in doc.split("\n"):
        if e.name in para:
            at = 0
            for sent in para.split(". "):
                if e.attrs[attr] in sent:
                    return start + at, start + at + len(sent) + 1
                at += len(sent) + 2
        start += len(para) + 1
    return 0, 0


def question(rng: random.Random, e: Entity, attr: str) -> QA:
    q = rng.choice(QUESTIONS[attr]).format(n=e.name)
    return QA(f"Question: {q}\nAnswer:", " " + e.attrs[attr], e, attr)


def context_prompt(doc: str, qa: QA) -> str:
    """The prompt with the document in context (no memory)."""
    return f"{doc}\n{qa.question}"


def eval_set(seed: int, n: int) -> list[tuple[str, QA]]:
    """``n`` (document, question about it) pairs, one entity per document."""
    rng = random.Random(seed)
    out = []
    for e in make_entities(rng, n):
        doc, attrs = document(rng, e)
        out.append((doc, question(rng, e, rng.choice(attrs))))
    return out


def distractor_docs(seed: int, n: int, per_doc: int = 5) -> list[str]:
    """``n`` documents of ``per_doc`` other people each (names disjoint from ``eval_set`` is not
    guaranteed, but collisions of two invented full names are very unlikely)."""
    rng = random.Random(seed)
    return [multi_document(rng, make_entities(rng, per_doc))[0] for _ in range(n)]


def tokenizer_corpus(seed: int, n: int) -> list[str]:
    """Texts the tokenizer is trained on: documents and question/answer lines."""
    rng = random.Random(seed)
    out = []
    for e in make_entities(rng, n):
        doc, attrs = document(rng, e)
        qa = question(rng, e, rng.choice(attrs))
        out.append(doc)
        out.append(qa.question + qa.answer + "\n")
    return out
