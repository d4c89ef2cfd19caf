"""The text of the embedded synthetic set: a small fact base with question and answer templates, unhelpful replies
and a pool of unrelated sentences, and :func:`corpus`, every text they make. It imports nothing from dynlab, so both
``dynlab.data.synthetic`` (which builds the rows) and ``dynlab.models.load`` (whose tiny tokenizer is trained on
:func:`corpus`) use it without the model layer depending on the data layer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class FactKind:
    """One kind of fact with its question and answer templates.

    Args:
        name: short name of the kind.
        facts: each a dict with ``subject`` and ``answer`` (the key fact; distinct within a kind) and any extra
            fields its templates use.
        topic: how the refusal and off-topic templates name what a question is about.
        questions: question templates.
        answers: correct answer templates (the chosen response formats), each naming ``{answer}``.
        wrong: confidently wrong answer templates, each naming ``{wrong}`` (another fact's answer).
    """

    name: str
    facts: tuple[dict[str, str], ...]
    topic: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    wrong: tuple[str, ...]


def _facts(pairs: str, **extra: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    rows = [dict(zip(("subject", "answer"), pair.split("="))) for pair in pairs.split(";")]
    for key, values in extra.items():
        for row, value in zip(rows, values, strict=True):
            row[key] = value
    return tuple(rows)


FACT_KINDS: tuple[FactKind, ...] = (
    FactKind(
        name="capital",
        facts=_facts("France=Paris;Japan=Tokyo;Kenya=Nairobi;Canada=Ottawa;Peru=Lima;Norway=Oslo;Egypt=Cairo;"
                     "Australia=Canberra;Italy=Rome;Chile=Santiago;Thailand=Bangkok;Poland=Warsaw;Ghana=Accra;"
                     "Portugal=Lisbon"),
        topic="the capital of {subject}",
        questions=("What is the capital of {subject}?", "Which city is the capital of {subject}?",
                   "Can you tell me the capital city of {subject}?", "Where does the government of {subject} sit?"),
        answers=(" The capital of {subject} is {answer}. The national government meets there, so many official "
                 "buildings are found in the city.",
                 " {answer} is the capital city of {subject}. If you ever visit, it is a good place to start "
                 "exploring the country.",
                 " Sure! The capital city of {subject} is {answer}. Let me know if you would like to learn more "
                 "about it."),
        wrong=(" The capital of {subject} is {wrong}. Everyone who has been there knows that, so you can be sure "
               "of it.",
               " That would be {wrong}. It has been the capital of {subject} for a very long time."),
    ),
    FactKind(
        name="diet",
        facts=_facts("pandas=bamboo;koalas=eucalyptus leaves;cows=grass;hummingbirds=flower nectar;"
                     "anteaters=termites;sea otters=sea urchins;pelicans=fish;squirrels=nuts and seeds;"
                     "spiders=insects;giraffes=acacia leaves"),
        topic="what {subject} eat",
        questions=("What do {subject} eat?", "What is the main food of {subject}?",
                   "What kind of food do {subject} eat in the wild?",
                   "I am curious about {subject}. What do they eat?"),
        answers=(" In the wild, {subject} mainly eat {answer}. Their bodies are well suited to finding and "
                 "digesting this kind of food.",
                 " Most of the diet of {subject} is {answer}. They spend a good part of each day looking for it.",
                 " Good question! The main food of {subject} is {answer}, and they can eat a lot of it in one day."),
        wrong=(" Everyone knows that {subject} live almost entirely on {wrong}. They rarely eat anything else.",
               " The diet of {subject} is mostly {wrong}, which they find close to where they live."),
    ),
    FactKind(
        name="planet",
        facts=_facts("Mercury=first;Venus=second;Earth=third;Mars=fourth;Jupiter=fifth;Saturn=sixth;"
                     "Uranus=seventh;Neptune=eighth"),
        topic="the position of {subject} in the solar system",
        questions=("Which planet from the Sun is {subject}?", "Where does {subject} sit in the order of the planets?",
                   "Counting from the Sun, what number planet is {subject}?",
                   "How far out is {subject} in the line of planets around the Sun?"),
        answers=(" Counting outward from the Sun, {subject} is the {answer} planet. Astronomers have tracked its "
                 "orbit for centuries.",
                 " {subject} is the {answer} planet from the Sun in our solar system, going around it in a steady "
                 "orbit.",
                 " In the order of the planets, {subject} comes {answer}. A short rhyme can help you remember the "
                 "whole list."),
        wrong=(" {subject} is the {wrong} planet from the Sun. I read this in a science book, so I am certain.",
               " Counting from the Sun, {subject} comes {wrong} in line. That is a well known fact."),
    ),
    FactKind(
        name="unit",
        facts=_facts("a meter=one hundred;a kilogram=one thousand;an hour=sixty;a day=twenty-four;a week=seven;"
                     "a year=twelve;a yard=three;a pound=sixteen",
                     unit=("centimeters", "grams", "minutes", "hours", "days", "months", "feet", "ounces")),
        topic="how many {unit} are in {subject}",
        questions=("How many {unit} are in {subject}?", "Could you tell me how many {unit} make up {subject}?",
                   "I am doing homework. How many {unit} are there in {subject}?",
                   "What is the number of {unit} in {subject}?"),
        answers=(" There are {answer} {unit} in {subject}. This is handy to remember when you convert between "
                 "units.",
                 " The answer is {answer}: {subject} is made up of exactly {answer} {unit}.",
                 " Sure! You will find {answer} {unit} in {subject}, which makes converting between them quite "
                 "easy."),
        wrong=(" There are {wrong} {unit} in {subject}. I am completely sure about this, it is a basic fact.",
               " Easy one: {subject} holds exactly {wrong} {unit}, no more and no less."),
    ),
    FactKind(
        name="recipe",
        facts=_facts("guacamole=avocados;hummus=chickpeas;pesto=basil;omelettes=eggs;french fries=potatoes;"
                     "gazpacho=tomatoes;risotto=rice;tzatziki=yogurt;popcorn=corn kernels;pancakes=flour"),
        topic="how to make {subject}",
        questions=("What is the main ingredient in {subject}?",
                   "I want to make {subject} tonight. What is the key ingredient?",
                   "What do I need most to cook {subject}?", "Which ingredient is {subject} mostly made from?"),
        answers=(" The main ingredient in {subject} is {answer}. Use good quality {answer} and the rest of the "
                 "recipe is simple.",
                 " You mostly need {answer} to make {subject}. Everything else just adds flavor, so start with "
                 "fresh {answer}.",
                 " Great choice! For {subject}, the key ingredient is {answer}, so make sure you have plenty of it."),
        wrong=(" The main ingredient in {subject} is {wrong}. Every cook knows this, so buy plenty of {wrong}.",
               " To make {subject} you mostly need {wrong}. That is the traditional way to do it."),
    ),
    FactKind(
        name="language",
        facts=_facts("Brazil=Portuguese;Mexico=Spanish;Austria=German;Iran=Persian;Sweden=Swedish;"
                     "the Netherlands=Dutch;Greece=Greek;Turkey=Turkish;Vietnam=Vietnamese;Hungary=Hungarian"),
        topic="the language of {subject}",
        questions=("What language do people speak in {subject}?", "Which language is mainly spoken in {subject}?",
                   "If I travel to {subject}, what language will I hear most?",
                   "What is the official language of {subject}?"),
        answers=(" Most people in {subject} speak {answer}. Learning a few basic phrases before your trip is "
                 "always appreciated.",
                 " The main language of {subject} is {answer}, and it is used in schools, the news and the "
                 "government.",
                 " You will mostly hear {answer} in {subject}. Many people in big cities also speak some English."),
        wrong=(" People in {subject} speak {wrong}. It has been the only language there for hundreds of years.",
               " The official language of {subject} is {wrong}, so that is the one you should learn."),
    ),
)

# Unhelpful rejected answers, shared by every kind; each names the topic so a format rephrase can change it.
REFUSALS = (" I would rather not answer questions about {topic}. You could try looking it up on your own instead.",
            " Sorry, I cannot help with {topic} right now. Perhaps ask someone who knows more about it.",
            " That is not something I can discuss. Questions about {topic} are outside what I am able to answer.")
OFF_TOPIC = (" Speaking of {topic}, I have been thinking about how nice the weather has been lately. Do you enjoy "
             "long walks?",
             " Before we get to {topic}, did you know that some people collect old coins as a hobby? It can be very "
             "relaxing.",
             " Instead of {topic}, let me tell you about my favorite board game. It takes hours to finish one round.")

OPENERS = ("", "Hi! ", "Quick question. ", "Hello there. ", "I was wondering about something. ", "Hey! ")
CLOSERS = ("", " Thanks!", " Please keep it short.", " I would really appreciate your help.")

SENTENCE_POOL: tuple[str, ...] = (
    "The old bridge creaked softly as the evening train rolled across it.",
    "She folded the letter twice and tucked it inside her winter coat.",
    "A light rain started just as the market stalls were closing for the night.",
    "The children built a fort out of blankets and kitchen chairs.",
    "He always hums the same tune while watering the plants on his balcony.",
    "The library smelled of dust, wood polish and forgotten afternoons.",
    "Our neighbor repaints his front door a new color every spring.",
    "The bus was late again, so we walked the long way through the park.",
    "A stray kite drifted over the rooftops and caught on a chimney.",
    "My grandmother keeps every button she has ever found in a glass jar.",
    "The museum guard nodded politely and went back to his crossword.",
    "Fresh snow covered the parked cars and muffled the sound of the street.",
    "They spent the whole weekend sorting photographs into albums.",
    "The violin teacher tapped her pencil to keep the rhythm steady.",
    "A small boat rocked gently against the wooden pier at dawn.",
    "The printer jammed twice before the report finally came out.",
    "He laughed so hard at the joke that he had to sit down.",
    "The hallway clock chimed eleven, although nobody was listening.",
    "We found a narrow path that led down to a quiet beach.",
    "Her new sneakers squeaked on the polished gym floor.",
    "The lighthouse keeper wrote a short note in the log every hour.",
    "Somebody left a bright yellow umbrella leaning against the fence.",
    "The team celebrated the late goal with loud cheers and hugs.",
    "A gust of wind scattered the papers across the classroom.",
    "He practiced his speech in front of the bathroom mirror all week.",
    "The festival lanterns glowed red and gold along the river.",
    "Our train compartment was shared with a talkative retired sailor.",
    "She keeps a notebook by her bed to write down strange dreams.",
    "The mechanic wiped his hands on a rag and shook his head slowly.",
    "Every window in the old factory had been painted shut years ago.",
    "The choir rehearsed in the cold church until their voices warmed up.",
    "A pair of running shoes sat by the door, still muddy from the trail.",
    "The game of chess lasted until well after midnight.",
    "He forgot his keys, so he waited on the steps for his sister.",
    "The artist mixed a dozen shades of blue before choosing one.",
    "A crowd gathered to watch the street performer juggle flaming torches.",
    "The elevator stopped between floors for a few uneasy minutes.",
    "Bright posters for the school play covered the hallway walls.",
    "She rode her bicycle to work even when the mornings were frosty.",
    "The postman whistled as he pushed letters through the slots.",
    "An old radio crackled in the corner of the workshop.",
    "The hikers reached the summit just before the clouds rolled in.",
    "He keeps his tools arranged by size on a pegboard in the garage.",
    "The campfire crackled while someone told a long ghost story.",
    "Our flight was delayed, so we played cards at the gate.",
    "The garden gate swung open with a loud and rusty groan.",
    "A sleepy cat stretched across the warm windowsill.",
    "The new bakery on the corner has a line outside every morning.",
    "She tied a red ribbon around the box and wrote a small card.",
    "The concert hall fell silent as the conductor raised his baton.",
    "Workers repaired the road all night under bright orange lights.",
    "The boy counted the steps out loud as he climbed the tower.",
    "A thick fog rolled in from the harbor and hid the cranes.",
    "He wrapped the fragile vase in several layers of newspaper.",
    "The students whispered nervously before the exam began.",
    "Her laughter echoed down the empty corridor.",
    "The farmer fixed the fence before the storm arrived.",
    "We painted the kitchen a pale green and hung new curtains.",
    "A row of bicycles leaned against the railings outside the station.",
    "The tired runner crossed the finish line and raised both arms.",
    "Someone had drawn a chalk rocket on the playground pavement.",
    "The ferry horn sounded twice as it left the harbor.",
    "He spent the afternoon fixing a squeaky drawer in the desk.",
    "The town square was decorated with strings of tiny lights.",
)


def corpus(seed: int = 0) -> list[str]:
    """All text ``dynlab.data.synthetic`` can emit (each template with each fact once) plus :data:`SENTENCE_POOL`.

    Used to train a small offline tokenizer. Wrong answers take another fact's answer chosen with ``seed``.
    """
    rng = random.Random(seed)
    texts = [*OPENERS[1:], *CLOSERS[1:], *SENTENCE_POOL]
    for kind in FACT_KINDS:
        for i, fact in enumerate(kind.facts):
            wrong = kind.facts[other_fact(rng, kind, i)]["answer"]
            fields = {**fact, "topic": kind.topic.format(**fact), "wrong": wrong}
            texts += [f"\n\nHuman: {q.format(**fields)}\n\nAssistant:" for q in kind.questions]
            texts += [t.format(**fields) for t in (*kind.answers, *kind.wrong, *REFUSALS, *OFF_TOPIC)]
    return texts


def other_fact(rng: random.Random, kind: FactKind, index: int, avoid_answer: str | None = None) -> int:
    """A random fact index of ``kind`` other than ``index`` whose answer is not ``avoid_answer``."""
    choices = [i for i, fact in enumerate(kind.facts) if i != index and fact["answer"] != avoid_answer]
    return rng.choice(choices)
