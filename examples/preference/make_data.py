"""A synthetic preference task for `ownlm tune --method dpo`: answer list questions with "- " bullets
instead of a numbered list.

    python examples/preference/make_data.py       # writes train.jsonl (pairs) and test.jsonl (held out)

The base model answers "Name three fruits." with "1. Bananas\\n2. Oranges\\n3. Grapes"; each training
pair prefers the same items as "- " bullets. The held-out rows use categories and phrasings that no
training row uses; `ownlm eval MODEL --task test.jsonl` reports the fraction of answers that follow
the preferred style (`pattern_match`: a line that starts with "- "). Deterministic (seeded)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CATEGORIES = {
    "fruits": ["apples", "bananas", "oranges", "grapes", "pears", "mangoes", "cherries", "plums", "kiwis"],
    "vegetables": ["carrots", "peas", "onions", "spinach", "broccoli", "potatoes", "leeks", "beets"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "animals that live in the ocean": ["dolphins", "whales", "sharks", "octopuses", "sea turtles", "squid", "seals"],
    "farm animals": ["cows", "pigs", "sheep", "goats", "chickens", "horses", "ducks"],
    "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "European capitals": ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Prague", "Dublin"],
    "musical instruments": ["piano", "violin", "guitar", "flute", "drums", "cello", "trumpet", "harp"],
    "programming languages": ["Python", "C", "Rust", "Java", "Go", "Haskell", "JavaScript", "Ruby"],
    "kitchen tools": ["a knife", "a whisk", "a ladle", "a grater", "a peeler", "tongs", "a colander"],
    "sports": ["football", "tennis", "swimming", "cycling", "rowing", "basketball", "golf", "skiing"],
    "birds": ["sparrows", "eagles", "owls", "parrots", "penguins", "robins", "crows", "swans"],
    "trees": ["oak", "maple", "birch", "pine", "willow", "cedar", "elm", "beech"],
    "metals": ["iron", "copper", "gold", "silver", "zinc", "tin", "aluminium", "nickel"],
    "rivers": ["the Nile", "the Amazon", "the Danube", "the Rhine", "the Thames", "the Mississippi", "the Ganges"],
    "board games": ["chess", "checkers", "Monopoly", "Scrabble", "backgammon", "Go", "Risk"],
    "flowers": ["roses", "tulips", "daisies", "lilies", "orchids", "sunflowers", "violets"],
    "weather phenomena": ["rain", "snow", "hail", "fog", "thunderstorms", "wind", "frost"],
    "shapes": ["a circle", "a square", "a triangle", "a hexagon", "an oval", "a rectangle", "a pentagon"],
    "clothes": ["a shirt", "trousers", "a coat", "socks", "a scarf", "a hat", "gloves"],
    "breakfast foods": ["porridge", "toast", "eggs", "pancakes", "yogurt", "cereal", "waffles"],
    "tools in a toolbox": ["a hammer", "a screwdriver", "pliers", "a wrench", "a saw", "a tape measure"],
    "languages spoken in Europe": ["French", "German", "Spanish", "Italian", "Polish", "Dutch", "Greek"],
    "things found in a classroom": ["desks", "chairs", "a whiteboard", "books", "pencils", "a clock"],
    "insects": ["ants", "bees", "beetles", "butterflies", "flies", "moths", "grasshoppers", "ladybirds"],
    "herbs": ["basil", "parsley", "mint", "thyme", "rosemary", "sage", "dill", "oregano"],
    "desserts": ["ice cream", "cake", "pie", "pudding", "brownies", "cookies", "custard"],
    "units of length": ["the metre", "the inch", "the foot", "the mile", "the kilometre", "the yard"],
    "parts of a car": ["the engine", "the wheels", "the brakes", "the steering wheel", "the seats", "the doors"],
    "gemstones": ["diamond", "ruby", "sapphire", "emerald", "opal", "topaz", "amethyst"],
}
HELD_OUT = {
    "dog breeds": ["labradors", "poodles", "beagles", "boxers", "collies", "terriers"],
    "cheeses": ["cheddar", "brie", "gouda", "feta", "parmesan", "mozzarella"],
    "ways to travel": ["by train", "by bus", "by bike", "on foot", "by car", "by plane"],
    "school subjects": ["maths", "history", "biology", "chemistry", "geography", "music"],
    "things to pack for a beach day": ["sunscreen", "a towel", "water", "a hat", "sunglasses", "a book"],
    "hobbies": ["reading", "painting", "gardening", "hiking", "knitting", "cooking"],
    "citrus fruits": ["lemons", "limes", "oranges", "grapefruits", "tangerines"],
    "famous composers": ["Bach", "Mozart", "Beethoven", "Chopin", "Vivaldi", "Brahms"],
    "ocean names": ["the Atlantic", "the Pacific", "the Indian Ocean", "the Arctic Ocean", "the Southern Ocean"],
    "kinds of bread": ["sourdough", "rye", "baguette", "pita", "brioche", "ciabatta"],
}
COUNT = {2: "two", 3: "three", 4: "four"}
TRAIN_ASKS = ["Name {n} {c}.", "List {n} {c}.", "Give me {n} {c}.", "What are {n} {c}?"]
TEST_ASKS = ["Can you suggest {n} {c}?", "Tell me {n} {c}, please."]


def pair(rng: random.Random, category: str, items: list[str], asks: list[str]) -> dict:
    n = rng.choice(list(COUNT))
    picked = [s[0].upper() + s[1:] for s in rng.sample(items, n)]
    prompt = rng.choice(asks).format(n=COUNT[n], c=category)
    return {"prompt": prompt,
            "chosen": "\n".join(f"- {s}" for s in picked),
            "rejected": "\n".join(f"{i}. {s}" for i, s in enumerate(picked, 1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent), help="folder for train.jsonl and test.jsonl")
    p.add_argument("--train", type=int, default=240)
    p.add_argument("--seed", type=int, default=2026)
    args = p.parse_args()
    rng = random.Random(args.seed)
    names = sorted(CATEGORIES)
    train = [pair(rng, c, CATEGORIES[c], TRAIN_ASKS) for c in (rng.choice(names) for _ in range(args.train))]
    test = [{"prompt": ask.format(n=COUNT[n], c=c), "pattern": r"(?m)^- \S"}
            for c in sorted(HELD_OUT) for ask in TEST_ASKS for n in (3, 4)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test), encoding="utf-8")
    print(f"wrote {len(train)} preference pairs and {len(test)} held-out prompts to {out}")


if __name__ == "__main__":
    main()
