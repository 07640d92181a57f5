"""The built-in data of the main job: generated bilingual chat (additions and a weather tool call), verifiable by
exact match, with a held-out set that shares no question with training.

Example:
    >>> from glm_train.data import builtin
    >>> train, heldout = builtin.skill_splits(n_train=100, n_heldout=10, seed=0)
    >>> train[0]["conversations"][-1]["role"]
    'assistant'
"""

import json
import random

# Built-in generated data: bilingual arithmetic and a weather tool call, verifiable by exact match.

WEATHER_TOOL = {"name": "get_weather", "parameters": {"city": {"type": "string"}}}
SYSTEM_PROMPT = "Use tools when needed."
CITIES = [
    ("Beijing", "北京"), ("Shanghai", "上海"), ("Guangzhou", "广州"), ("Shenzhen", "深圳"), ("Hangzhou", "杭州"),
    ("Chengdu", "成都"), ("Wuhan", "武汉"), ("Xi'an", "西安"), ("Nanjing", "南京"), ("Tianjin", "天津"),
    ("Chongqing", "重庆"), ("Suzhou", "苏州"), ("Qingdao", "青岛"), ("Dalian", "大连"), ("Xiamen", "厦门"),
    ("Harbin", "哈尔滨"), ("Kunming", "昆明"), ("Lhasa", "拉萨"), ("Tokyo", "东京"), ("Paris", "巴黎"),
    ("London", "伦敦"), ("Berlin", "柏林"), ("Rome", "罗马"), ("Madrid", "马德里"), ("Moscow", "莫斯科"),
    ("Cairo", "开罗"), ("Sydney", "悉尼"), ("Toronto", "多伦多"), ("Seoul", "首尔"), ("Singapore", "新加坡"),
]
WEATHER_TEMPLATES = {
    "en": ["What's the weather in {city}?", "How is the weather in {city} today?",
           "Check the weather for {city}, please."],
    "zh": ["{city}天气怎么样？", "帮我查一下{city}的天气。", "{city}今天天气如何？"],
}
ADDITION_TEMPLATES = {"en": "What is {a} plus {b}?", "zh": "{a}+{b}等于多少？"}
CONDITIONS = {"en": ["sunny", "cloudy", "rainy", "windy"], "zh": ["晴", "多云", "小雨", "有风"]}


def addition_conversation(a: int, b: int, lang: str) -> list:
    """'What is 12 plus 35?' / '12+35等于多少？' answered with the bare sum."""
    return [
        {"role": "user", "content": ADDITION_TEMPLATES[lang].format(a=a, b=b)},
        {"role": "assistant", "content": str(a + b)},
    ]


def weather_conversation(city_index: int, template_index: int, lang: str, rng: random.Random) -> list:
    """System message with the weather tool, a request, the tool call, its observation and the final answer."""
    city = CITIES[city_index][0 if lang == "en" else 1]
    condition = rng.randrange(len(CONDITIONS[lang]))
    temperature = rng.randrange(-5, 36)
    observation = json.dumps({"weather": CONDITIONS["en"][condition], "temperature": temperature})
    answer = (f"{city}: {CONDITIONS['en'][condition]}, {temperature}°C" if lang == "en"
              else f"{city}：{CONDITIONS['zh'][condition]}，{temperature}°C")
    return [
        {"role": "system", "content": SYSTEM_PROMPT, "tools": [WEATHER_TOOL]},
        {"role": "user", "content": WEATHER_TEMPLATES[lang][template_index].format(city=city)},
        {"role": "assistant", "metadata": WEATHER_TOOL["name"],
         "content": f"```python\ntool_call(city={city!r})\n```"},
        {"role": "observation", "content": observation},
        {"role": "assistant", "content": answer},
    ]


def skill_splits(n_train: int = 20000, n_heldout: int = 200, seed: int = 0, tool_fraction: float = 0.3):
    """Generated training conversations and a held-out set that shares no (question, language) with them.

    Held-out items are whole questions never seen in training: addition pairs (a, b) held out in both languages, and
    (city, template, language) combinations held out for the tool call. Each held-out row has `conversations`
    (ending with the reply to verify) and `kind` ("addition" or "tool_call").
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    n_heldout_add = n_heldout - n_heldout // 3
    heldout_pairs, train_pairs = pairs[:n_heldout_add], pairs[n_heldout_add:]
    combos = [(c, t, lang) for c in range(len(CITIES)) for t in range(3) for lang in ("en", "zh")]
    rng.shuffle(combos)
    n_heldout_tool = n_heldout // 3
    heldout_combos, train_combos = combos[:n_heldout_tool], combos[n_heldout_tool:]

    heldout = [{"conversations": addition_conversation(a, b, rng.choice(("en", "zh"))), "kind": "addition"}
               for a, b in heldout_pairs]
    heldout += [{"conversations": weather_conversation(*combo, rng)[:3], "kind": "tool_call"}
                for combo in heldout_combos]
    train = []
    for _ in range(n_train):
        if rng.random() < tool_fraction:
            train.append({"conversations": weather_conversation(*rng.choice(train_combos), rng)})
        else:
            a, b = rng.choice(train_pairs)
            train.append({"conversations": addition_conversation(a, b, rng.choice(("en", "zh")))})
    return train, heldout


