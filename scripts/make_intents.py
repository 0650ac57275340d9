"""Write edgecli's shipped smart-home intent dataset (edgecli/data/intents/{train,test}.csv).

    python scripts/make_intents.py            # rewrites both files (seeded: same output every run)

Train and test sentences come from DISJOINT template sets (different phrasings, word order and
politeness), and part of the slot values (rooms, songs, durations) appear only in the test set,
so test accuracy measures generalisation to new wordings rather than recall of training sentences.
Pure standard library: no model, no download.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "edgecli" / "data" / "intents"

# slot values: shared ones appear in both splits; *_TEST ones only in the test split
SLOTS_TRAIN = {
    "room": ["kitchen", "living room", "bedroom", "bathroom", "hallway", "office", "garage", "dining room"],
    "temp": ["18", "19", "20", "21", "22", "23", "68", "70", "72"],
    "song": ["some jazz", "the beatles", "my workout playlist", "lofi beats", "taylor swift", "classical music",
             "the news podcast", "relaxing piano"],
    "dur": ["5 minutes", "ten minutes", "30 seconds", "an hour", "25 minutes", "two minutes", "90 seconds"],
    "city": ["london", "paris", "new york", "berlin", "tokyo", "madrid"],
    "day": ["today", "tomorrow", "this weekend", "tonight", "on friday"],
    "door": ["front door", "back door", "garage door", "side door", "patio door"],
    "level": ["50 percent", "level 3", "half", "20", "max"],
}
SLOTS_TEST = {
    "room": ["nursery", "basement", "guest room", "kids room", "study", "kitchen", "bedroom"],
    "temp": ["17", "24", "25", "65", "74", "21"],
    "song": ["some rock music", "coldplay", "the morning playlist", "an audiobook", "beethoven", "some jazz"],
    "dur": ["15 minutes", "three minutes", "45 seconds", "twenty minutes", "5 minutes"],
    "city": ["rome", "sydney", "chicago", "lisbon", "london"],
    "day": ["this afternoon", "next week", "tomorrow morning", "today"],
    "door": ["basement door", "cellar door", "front door", "main entrance"],
    "level": ["70 percent", "level 8", "a quarter", "10"],
}

TRAIN = {
    "lights_on": [
        "turn on the {room} lights", "switch on the lights in the {room}", "lights on in the {room}",
        "please turn the {room} light on", "can you switch the {room} lamp on", "put the lights on",
        "turn the lights on in the {room} please", "I need some light in the {room}", "light up the {room}",
        "could you turn on the lamp", "make it bright in the {room}",
        "it is too dark in the {room}", "I can't see anything in here", "hey, lights on please",
    ],
    "lights_off": [
        "turn off the {room} lights", "switch off the lights in the {room}", "lights off in the {room}",
        "please turn the {room} light off", "can you switch the {room} lamp off", "kill the lights",
        "turn the lights off in the {room} please", "shut off the {room} lights", "make it dark in the {room}",
        "no more lights in the {room}", "could you turn off the lamp",
        "it is too bright in the {room}", "hey, switch everything off in the {room}", "lights off please",
    ],
    "set_temperature": [
        "set the thermostat to {temp} degrees", "make it {temp} degrees in the {room}", "heat the house to {temp}",
        "change the temperature to {temp}", "I want it warmer", "turn the heating up to {temp}",
        "cool the {room} down to {temp}", "set the heat to {temp} please", "it is too cold in here",
        "lower the temperature to {temp} degrees",
    ],
    "play_music": [
        "play {song}", "put on {song}", "start playing {song}", "I want to listen to {song}",
        "play {song} in the {room}", "can you play {song}", "queue up {song}", "let's hear {song}",
        "play some music", "start the music in the {room}",
    ],
    "stop_music": [
        "stop the music", "pause the music", "stop playing", "pause {song}", "turn the music off",
        "stop the song in the {room}", "pause playback", "halt the music please", "no more music",
        "stop playing {song}",
    ],
    "change_volume": [
        "turn the volume up", "turn it down", "make it louder", "set the volume to {level}",
        "volume {level}", "lower the volume in the {room}", "raise the volume", "it is too loud",
        "increase the volume please", "turn the sound down a bit",
        "I can barely hear the music", "the music is too quiet", "hey, louder please",
    ],
    "set_timer": [
        "set a timer for {dur}", "start a {dur} timer", "timer for {dur}", "count down {dur}",
        "remind me in {dur}", "can you set a timer for {dur}", "put a timer on for {dur}",
        "I need a timer for {dur}", "start the countdown for {dur}", "set a {dur} countdown",
    ],
    "get_weather": [
        "what is the weather like {day}", "will it rain {day}", "weather in {city}", "how hot is it in {city}",
        "what's the forecast for {day}", "is it sunny in {city} {day}", "do I need an umbrella {day}",
        "tell me the weather in {city}", "how cold will it be {day}", "what's the temperature outside",
    ],
    "lock_door": [
        "lock the {door}", "please lock the {door}", "is the {door} locked? lock it", "secure the {door}",
        "lock all the doors", "can you lock the {door}", "lock up the house", "make sure the {door} is locked",
        "bolt the {door}", "lock everything up for the night",
        "I want the {door} locked", "make sure nobody can get in through the {door}", "get the {door} locked",
    ],
    "unlock_door": [
        "unlock the {door}", "please unlock the {door}", "open the lock on the {door}", "let me in the {door}",
        "unlock all the doors", "can you unlock the {door}", "unbolt the {door}", "release the lock on the {door}",
        "unlock the house", "disable the lock on the {door}",
        "I want the {door} unlocked", "open the {door} for the delivery", "get the {door} unlocked",
    ],
}

TEST = {
    "lights_on": [
        "hey, could you brighten the {room} for me", "the {room} is too dark, lights please",
        "I'd like the {room} lights switched on", "get the {room} lights going", "turn {room} lighting on",
    ],
    "lights_off": [
        "hey, could you darken the {room} for me", "I'd like the {room} lights switched off",
        "switch the {room} lighting off", "the {room} lights can go off now", "lights out in the {room}",
    ],
    "set_temperature": [
        "warm the {room} up to {temp}", "I'd like the thermostat at {temp}", "adjust the heating to {temp} degrees",
        "bring the temperature in the {room} to {temp}", "it's freezing, raise the heat to {temp}",
    ],
    "play_music": [
        "I'd love to hear {song}", "could you put {song} on in the {room}", "music please, {song}",
        "throw on {song}", "begin playback of {song}",
    ],
    "stop_music": [
        "that's enough music, stop it", "could you pause what's playing", "silence the music in the {room}",
        "end the playback", "stop {song} now",
    ],
    "change_volume": [
        "a bit louder please", "could you turn the sound up", "reduce the volume in the {room}",
        "change the volume to {level}", "the music is too quiet, louder",
    ],
    "set_timer": [
        "I need a {dur} reminder timer", "could you time {dur} for me", "begin a countdown of {dur}",
        "alert me after {dur}", "timer please, {dur}",
    ],
    "get_weather": [
        "what's it like outside in {city} {day}", "is it going to snow {day}", "give me the {city} forecast",
        "should I bring a jacket {day}", "how's the weather looking {day}",
    ],
    "lock_door": [
        "could you make the {door} secure", "I'd like the {door} locked", "lock the {door} for me now",
        "please get the {door} locked up", "is the {door} open? then lock it",
    ],
    "unlock_door": [
        "could you open up the {door} lock", "I'd like the {door} unlocked", "unlock the {door} for me now",
        "please get the {door} unlocked", "let the guests in through the {door}",
    ],
}


def fill(templates: list[str], slots: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    """``n`` distinct sentences from ``templates`` (or all of them if fewer exist), spread over templates."""
    pools = []
    for t in templates:
        keys = [k for k in slots if "{" + k + "}" in t]
        combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(slots[k] for k in keys))]
        rng.shuffle(combos)
        pools.append([t.format(**c) for c in combos])
    out: list[str] = []
    seen: set[str] = set()
    # round-robin over templates so every phrasing is represented
    while len(out) < n and any(pools):
        for pool in pools:
            while pool:
                s = pool.pop()
                if s not in seen:
                    seen.add(s)
                    out.append(s)
                    break
            if len(out) >= n:
                break
    return out


def build(train_per_class: int, test_per_class: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rng = random.Random(seed)
    train = [(s, label) for label, ts in TRAIN.items() for s in fill(ts, SLOTS_TRAIN, train_per_class, rng)]
    test = [(s, label) for label, ts in TEST.items() for s in fill(ts, SLOTS_TEST, test_per_class, rng)]
    overlap = {s for s, _ in train} & {s for s, _ in test}
    assert not overlap, f"train and test share sentences: {sorted(overlap)[:3]}"
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--train-per-class", type=int, default=50)
    ap.add_argument("--test-per-class", type=int, default=15)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    train, test = build(a.train_per_class, a.test_per_class, a.seed)
    write(a.out / "train.csv", train)
    write(a.out / "test.csv", test)
    print(f"wrote {len(train)} train and {len(test)} test sentences ({len(TRAIN)} intents) to {a.out}")


if __name__ == "__main__":
    main()
