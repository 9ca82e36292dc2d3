"""Text the speech items say: a phrase bank for transcription, a sentence bank for the other
speech tasks, and a multiple-choice question bank (arithmetic, comparisons, everyday facts) in
the style of VoiceBench's MMSU / OBQA.

Everything is generated from fixed word lists and a seed: the same seed gives the same banks.
Splits are made by the caller on the *text* of each entry, so no sentence or question appears in
two splits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ADJECTIVES = [
    "red",
    "small",
    "quiet",
    "happy",
    "old",
    "bright",
    "heavy",
    "cold",
    "green",
    "tall",
    "soft",
    "brave",
    "lazy",
    "quick",
    "clever",
    "young",
    "dark",
    "warm",
    "strange",
    "gentle",
]
NOUNS = [
    "dog",
    "teacher",
    "river",
    "garden",
    "doctor",
    "bird",
    "farmer",
    "window",
    "child",
    "horse",
    "painter",
    "kitten",
    "sailor",
    "baker",
    "mountain",
    "student",
    "lamp",
    "rabbit",
    "captain",
    "neighbor",
]
VERBS = [
    "watches",
    "finds",
    "paints",
    "follows",
    "helps",
    "visits",
    "carries",
    "likes",
    "calls",
    "cleans",
    "opens",
    "draws",
    "greets",
    "feeds",
    "moves",
    "builds",
]
PLACES = [
    "near the house",
    "in the morning",
    "after lunch",
    "by the lake",
    "at night",
    "in the park",
    "before dinner",
    "on the hill",
    "in the city",
    "under the bridge",
]

NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]

# (thing, size rank): larger rank is bigger; used for "which is larger" questions.
SIZES = [
    ("an ant", 1),
    ("a coin", 2),
    ("a mouse", 3),
    ("an apple", 4),
    ("a book", 5),
    ("a cat", 6),
    ("a chair", 7),
    ("a bicycle", 8),
    ("a horse", 9),
    ("a car", 10),
    ("an elephant", 11),
    ("a house", 12),
    ("a whale", 13),
    ("a mountain", 14),
]
SPEEDS = [
    ("a snail", 1),
    ("a turtle", 2),
    ("a person walking", 3),
    ("a bicycle", 4),
    ("a horse", 5),
    ("a car", 6),
    ("a train", 7),
    ("an airplane", 8),
    ("a rocket", 9),
]
FACTS = [  # question, right answer, three wrong answers
    ("What color is the sky on a clear day?", "blue", ["green", "red", "yellow"]),
    ("What color is fresh grass?", "green", ["blue", "purple", "white"]),
    ("Which animal says moo?", "a cow", ["a cat", "a dog", "a duck"]),
    ("Which animal barks?", "a dog", ["a cow", "a fish", "a horse"]),
    ("What do bees make?", "honey", ["milk", "bread", "wool"]),
    ("How many days are in a week?", "seven", ["five", "ten", "twelve"]),
    ("How many legs does a spider have?", "eight", ["six", "four", "ten"]),
    ("What do we use to see?", "eyes", ["ears", "hands", "feet"]),
    ("What do we use to hear?", "ears", ["eyes", "teeth", "knees"]),
    ("Where do fish live?", "in water", ["in trees", "in the sand", "in the sky"]),
    ("What falls from clouds when it rains?", "water", ["sand", "milk", "leaves"]),
    ("What is frozen water called?", "ice", ["steam", "salt", "glass"]),
    ("Which season is the coldest?", "winter", ["summer", "spring", "autumn"]),
    ("What do cows give us?", "milk", ["honey", "eggs", "silk"]),
    ("What shines in the sky during the day?", "the sun", ["the moon", "a lamp", "a candle"]),
    ("What do plants need to grow?", "sunlight", ["darkness", "plastic", "noise"]),
    ("How many hours are in a day?", "twenty four", ["twelve", "thirty", "sixty"]),
    ("Which fruit is yellow and long?", "a banana", ["a cherry", "a grape", "a plum"]),
    ("What do we wear on our feet?", "shoes", ["hats", "gloves", "scarves"]),
    ("Which bird cannot fly?", "a penguin", ["a sparrow", "an eagle", "a pigeon"]),
    ("What do you call a baby cat?", "a kitten", ["a puppy", "a calf", "a foal"]),
    ("What do you call a baby dog?", "a puppy", ["a kitten", "a lamb", "a chick"]),
    ("Which planet do we live on?", "the earth", ["mars", "venus", "jupiter"]),
    ("What is the opposite of hot?", "cold", ["warm", "loud", "tall"]),
    ("What is the opposite of up?", "down", ["left", "over", "near"]),
    ("What is the opposite of day?", "night", ["noon", "light", "week"]),
    ("Which tool do we use to cut paper?", "scissors", ["a spoon", "a brush", "a pillow"]),
    ("What do we drink when we are thirsty?", "water", ["sand", "soap", "oil"]),
    ("Which animal has a long trunk?", "an elephant", ["a lion", "a zebra", "a goat"]),
    ("Which animal has black and white stripes?", "a zebra", ["a bear", "a frog", "a sheep"]),
    ("How many months are in a year?", "twelve", ["ten", "seven", "twenty"]),
    ("What color is snow?", "white", ["black", "orange", "pink"]),
    ("What do we use to write on paper?", "a pen", ["a fork", "a cup", "a shoe"]),
    ("Where does a bird build its nest?", "in a tree", ["in the sea", "in a car", "in an oven"]),
    ("Which meal do we eat in the morning?", "breakfast", ["dinner", "supper", "dessert"]),
    ("What is the color of a ripe tomato?", "red", ["blue", "grey", "brown"]),
]


@dataclass(frozen=True)
class MCQuestion:
    question: str  # the question alone
    choices: tuple[str, ...]  # in presentation order
    answer: int  # index of the right choice

    @property
    def letter(self) -> str:
        return "ABCD"[self.answer]

    def spoken(self) -> str:
        """The question with its options, as read aloud (VoiceBench MMSU / OBQA style)."""
        opts = ". ".join(f"Option {'ABCD'[i]}: {c}" for i, c in enumerate(self.choices))
        return f"{self.question} {opts}."


def phrase_bank() -> list[str]:
    """Every "adjective noun" phrase (400): transcription targets. Splits take disjoint phrases, so a
    test phrase is a new combination of words that training examples have spoken."""
    return [f"{a} {n}" for a in ADJECTIVES for n in NOUNS]


def sentence_bank(n: int, seed: int) -> list[str]:
    """n distinct simple sentences ("The quick teacher follows the red horse near the house.")."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        s = (
            f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} "
            f"{rng.choice(NOUNS)} {rng.choice(PLACES)}."
        )
        out[s] = None
    return list(out)


def number_words(n: int) -> str:
    """0-99 in words ("twenty four")."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_words covers 0-99, got {n}")
    if n <= 20:
        return NUMBER_WORDS[n]
    tens = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"][n // 10]
    return tens if n % 10 == 0 else f"{tens} {NUMBER_WORDS[n % 10]}"


def question_bank(n: int, seed: int, wide: bool = False) -> list[MCQuestion]:
    """n distinct four-option questions: arithmetic, size and speed comparisons, everyday facts.

    wide=False draws operands 0-10 and asks which is larger / faster (about 500 distinct questions;
    the default corpus's 100 come from it, unchanged). wide=True draws operands 0-20 and also asks
    which is smaller / slower (about 1,200): enough for a spoken-knowledge test split of ~100
    distinct questions per seed."""
    rng = random.Random(seed)
    out: dict[str, MCQuestion] = {}
    top = 20 if wide else 10

    def add(question: str, right: str, wrong: list[str]) -> None:
        if question in out or len(set(wrong) | {right}) < 4:
            return
        choices = [right, *rng.sample(wrong, 3)]
        rng.shuffle(choices)
        out[question] = MCQuestion(question, tuple(choices), choices.index(right))

    for q, right, wrong in FACTS:
        add(q, right, wrong)
    attempts = 0
    while len(out) < n and attempts < 100 * n:
        attempts += 1
        kind = rng.random()
        if kind < 0.5:  # arithmetic on small numbers, answers as words
            a, b = rng.randint(0, top), rng.randint(0, top)
            if rng.random() < 0.5 or a < b:
                q, r = f"What is {number_words(a)} plus {number_words(b)}?", a + b
            else:
                q, r = f"What is {number_words(a)} minus {number_words(b)}?", a - b
            wrong = sorted({max(0, min(2 * top, r + d)) for d in (-3, -2, -1, 1, 2, 3)} - {r})
            add(q, number_words(r), [number_words(w) for w in wrong])
        else:  # comparisons: which of two is larger / faster (wide: or smaller / slower)
            table, adj = (SIZES, "larger") if kind < 0.8 else (SPEEDS, "faster")
            smaller = wide and rng.random() < 0.5
            if smaller:
                adj = {"larger": "smaller", "faster": "slower"}[adj]
            x, y = rng.sample(table, 2)
            others = [t for t, _ in table if t not in (x[0], y[0])]
            right = x[0] if (x[1] > y[1]) != smaller else y[0]
            wrong_pair = y[0] if right == x[0] else x[0]
            question = f"Which is {adj}, {x[0]} or {y[0]}?"
            add(question, right, [wrong_pair, *rng.sample(others, 2)])
    if len(out) < n:
        raise ValueError(f"the question bank holds {len(out)} distinct questions, fewer than the {n} asked for")
    return list(out.values())[:n]
