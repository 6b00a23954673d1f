"""What the base model must already know for the paper's OCR claims to be testable on it (Sec. 5.1): a
first-hop update composes the new fact name -> city with the known city -> language, a second-hop update the new
city -> mayor with the known landmark -> city. If the base model does not know that known hop, a failure of OCR
says nothing about extractive structures, and the claims report 'inconclusive' (claims.BASE_KNOWS).

base_knowledge measures, with the mean rank of Sec. 3 among the split's 20 answers, the known hops alone and
both hops with the new fact given in context (can the model compose them at all, with nothing finetuned?).
report.py runs it as a stage and writes its dict to seed{s}/preconditions.json.
"""
import data


def known_hop_examples(seed=0):
    """{key: [Example]}: the known hops on their own, and the two-hop implications with the fact in context.
    The cities, languages and landmarks are data.py's, paired with names by the same seed as the datasets."""
    pairs = data.hop_pairs(seed)                                   # [(name, (city, language, landmark))]
    return {
        "city_language": [data.Example(f"The people in the city of {c} speak", lang) for c, lang, _ in data.CITIES],
        "landmark_city": [data.Example(f"{lm} is in the city of", c) for c, _, lm in data.CITIES],
        # the first-hop implication with its fact stated just before it
        "in_context_first_hop": [data.Example(f"{n} lives in {c}. The people in the city {n} is from speak", lang)
                                 for n, (c, lang, _) in pairs],
        # the second-hop implication with its fact stated just before it
        "in_context_second_hop": [data.Example(f"The mayor of {c} is {n}. The mayor of the city that contains "
                                               f"{lm} is", n) for n, (c, _, lm) in pairs],
    }


def base_knowledge(model, tok, seed=0):
    """{key: the base model's mean rank} for the keys of known_hop_examples, plus the number of examples and one
    prompt of each, so that preconditions.json says what was asked."""
    ex = known_hop_examples(seed)
    out = {k: data.mean_rank(model, tok, v) for k, v in ex.items()}
    out["n"] = {k: len(v) for k, v in ex.items()}
    out["example_prompt"] = {k: f"{v[0].prompt} -> {v[0].answer}" for k, v in ex.items()}
    out["seed"] = seed
    return out
