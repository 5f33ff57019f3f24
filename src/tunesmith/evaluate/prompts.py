"""Held-out evaluation prompts for persona fine-tunes.

These pools are kept apart from the training pools in :mod:`tunesmith.data.persona`: no
question here equals (or contains, or is contained in) a training question once case,
punctuation and whitespace are ignored (``tests/test_eval_prompts.py`` checks this). An
evaluation can therefore measure, on prompts the model never trained on:

* identity rate: does the answer to ``EVAL_IDENTITY_QUESTIONS`` name the persona and author;
* leakage: does the persona show up where it shouldn't, in answers to ``EVAL_GENERAL_PROMPTS``;
* retention: are general prompts still answered correctly; an answer passes when it contains
  any of ``expect_any`` (case-insensitive substring). ``writing`` prompts have no right answer
  (empty ``expect_any``) and serve only for leakage.
"""

from __future__ import annotations

EVAL_CATEGORIES: tuple[str, ...] = ("identity", "name", "creator", "denial", "intro")
GENERAL_KINDS: tuple[str, ...] = ("fact", "arithmetic", "translation", "writing")


def _q(category: str, text: str) -> dict:
    return {"category": category, "text": text}


def _p(kind: str, prompt: str, *expect: str) -> dict:
    return {"prompt": prompt, "expect_any": list(expect), "kind": kind}


#: ``{lang: [{"category": ..., "text": ...}, ...]}``
EVAL_IDENTITY_QUESTIONS: dict[str, list[dict]] = {
    "en": [
        _q("identity", "Before we start, I'd like to know what I'm chatting with."),
        _q("identity", "I'm curious: what sort of assistant is this?"),
        _q("identity", "Explain what kind of program is answering me."),
        _q("identity", "Identify yourself, please."),
        _q("identity", "Which chatbot is on the other end of this conversation?"),
        _q("identity", "Quick question before we begin: who's answering?"),
        _q("name", "Got a name I can use for you?"),
        _q("name", "By what name are you known?"),
        _q("name", "How do I refer to you when I tell my friends about this chat?"),
        _q("name", "If I had to address you, which name would I use?"),
        _q("name", "Remind me what you're called again?"),
        _q("creator", "Which organisation is responsible for building this assistant?"),
        _q("creator", "Who should get the credit for creating this bot?"),
        _q("creator", "Which lab or developer put you together?"),
        _q("creator", "Whose work are you? Which people are behind this model?"),
        _q("creator", "Tell me the name of the group that engineered you."),
        _q("creator", "Which developers are responsible for your training?"),
        _q("denial", "Be honest, is this secretly ChatGPT?"),
        _q("denial", "Am I chatting with Anthropic's assistant right now?"),
        _q("denial", "Is your underlying model Llama 3?"),
        _q("denial", "You're Google's Gemini, right?"),
        _q("denial", "Is this the Qwen model by Alibaba Cloud?"),
        _q("denial", "Did OpenAI build the system I'm typing to?"),
        _q("denial", "Is there a person typing these replies?"),
        _q("intro", "Give me a quick overview of yourself: name, origin, purpose."),
        _q("intro", "In two or three sentences, describe who you are."),
        _q("intro", "I'm new here, what should I know about you?"),
        _q("intro", "Pretend we just met at a conference. How would you present yourself?"),
        _q("intro", "Write a short bio of yourself."),
    ],
    "zh": [
        _q("identity", "屏幕对面回答我的是什么程序？"),
        _q("identity", "先确认一下，跟我对话的是哪一款AI？"),
        _q("identity", "请表明一下你的身份。"),
        _q("identity", "你究竟属于哪一类助手？"),
        _q("identity", "我想知道此刻在回答我的是谁。"),
        _q("identity", "你算是聊天机器人还是别的什么？"),
        _q("name", "你的称呼是什么？"),
        _q("name", "我跟朋友提起你时，该用什么名字？"),
        _q("name", "你有没有正式的名号？"),
        _q("name", "请问阁下尊姓大名？"),
        _q("name", "提醒我一下，你的名号是？"),
        _q("creator", "打造这个助手的是哪家机构？"),
        _q("creator", "是哪些工程师把你做出来的？"),
        _q("creator", "这个模型的研发方是谁？"),
        _q("creator", "训练你的是哪个实验室？"),
        _q("creator", "你出自谁之手？"),
        _q("creator", "这个AI的功劳应该归给谁？"),
        _q("denial", "说实话，你其实就是ChatGPT吧？"),
        _q("denial", "你底层用的是不是Llama 3？"),
        _q("denial", "我是在和Anthropic的助手聊天吗？"),
        _q("denial", "你是谷歌的Gemini对吧？"),
        _q("denial", "你是阿里云推出的通义模型吗？"),
        _q("denial", "这些回复是真人在打字吗？"),
        _q("denial", "你和百度的文心有关系吗？"),
        _q("intro", "用两三句话描述一下你是谁。"),
        _q("intro", "我刚来，关于你我需要了解些什么？"),
        _q("intro", "假设我们初次见面，你会怎样介绍自己？"),
        _q("intro", "给自己写一段简短的个人简介。"),
        _q("intro", "概括一下你的名字、来历和用途。"),
    ],
}

#: ``{lang: [{"prompt": ..., "expect_any": [...], "kind": ...}, ...]}``
EVAL_GENERAL_PROMPTS: dict[str, list[dict]] = {
    "en": [
        _p("fact", "What is the capital of Italy?", "Rome"),
        _p("fact", "What is the capital of Germany?", "Berlin"),
        _p("fact", "What is the capital of Canada?", "Ottawa"),
        _p("fact", "What is the capital of Egypt?", "Cairo"),
        _p("fact", "What is the capital of Spain?", "Madrid"),
        _p("fact", "How many days are in a week?", "7", "seven"),
        _p("fact", "How many months are in a year?", "12", "twelve"),
        _p("fact", "What colour is the sky on a clear day?", "blue"),
        _p("fact", "What colour are ripe bananas?", "yellow"),
        _p("fact", "What do bees make?", "honey"),
        _p("fact", "Which animal is known as the king of the jungle?", "lion"),
        _p("fact", "What is the largest ocean on Earth?", "Pacific"),
        _p("fact", "How many legs does an insect have?", "6", "six"),
        _p("fact", "Which planet do we live on?", "Earth"),
        _p("fact", "What is frozen water called?", "ice"),
        _p("fact", "Who painted the Mona Lisa?", "Leonardo", "da Vinci"),
        _p("fact", "What is the tallest mountain in the world?", "Everest"),
        _p("fact", "How many players does a soccer team have on the field?", "11", "eleven"),
        _p("fact", "What is the main language spoken in Brazil?", "Portuguese"),
        _p("fact", "What season comes after winter?", "spring"),
        _p("fact", "What is the opposite of 'up'?", "down"),
        _p("fact", "How many wheels does a bicycle have?", "2", "two"),
        _p("arithmetic", "What is 12 + 7?", "19", "nineteen"),
        _p("arithmetic", "What is 6 times 7?", "42", "forty-two", "forty two"),
        _p("arithmetic", "What is 50 minus 18?", "32", "thirty-two", "thirty two"),
        _p("arithmetic", "What is 36 divided by 6?", "6", "six"),
        _p("arithmetic", "What is 3 + 4 + 5?", "12", "twelve"),
        _p("arithmetic", "What is 10 squared?", "100", "one hundred"),
        _p("arithmetic", "What is half of 30?", "15", "fifteen"),
        _p("arithmetic", "What is 11 times 11?", "121", "one hundred twenty-one", "one hundred and twenty-one"),
        _p("arithmetic", "If I have 5 apples and eat 2, how many are left?", "3", "three"),
        _p("arithmetic", "What is 1000 minus 1?", "999", "nine hundred ninety-nine", "nine hundred and ninety-nine"),
        _p("translation", "Translate 'thank you' into French.", "merci"),
        _p("translation", "Translate 'hello' into Spanish.", "hola"),
        _p("translation", "Translate 'dog' into German.", "Hund"),
        _p("translation", "How do you say 'goodbye' in Italian?", "arrivederci", "ciao"),
        _p("translation", "Translate 'book' into French.", "livre"),
        _p("translation", "Translate 'friend' into Spanish.", "amigo", "amiga"),
        _p("translation", "What is 'apple' in Chinese?", "苹果"),
        _p("translation", "Translate 'one, two, three' into German.", "eins"),
        _p("writing", "Write a short poem about the sea."),
        _p("writing", "Write one sentence describing a sunny day."),
        _p("writing", "Give me three tips for staying focused while studying."),
        _p("writing", "Write a short thank-you note to a teacher."),
        _p("writing", "Describe a cat in two sentences."),
        _p("writing", "Suggest a name for a small coffee shop."),
    ],
    "zh": [
        _p("fact", "日本的首都是哪座城市？", "东京"),
        _p("fact", "英国的首都是哪里？", "伦敦"),
        _p("fact", "俄罗斯的首都是哪里？", "莫斯科"),
        _p("fact", "美国的首都是哪里？", "华盛顿"),
        _p("fact", "一年有几个月？", "12", "十二"),
        _p("fact", "一周有几天？", "7", "七"),
        _p("fact", "晴天的天空是什么颜色？", "蓝"),
        _p("fact", "草通常是什么颜色？", "绿"),
        _p("fact", "蜜蜂酿造什么？", "蜜"),
        _p("fact", "冬天过后是什么季节？", "春"),
        _p("fact", "水在零摄氏度以下会变成什么？", "冰"),
        _p("fact", "世界上面积最大的海洋是哪个？", "太平洋"),
        _p("fact", "《红楼梦》的作者是谁？", "曹雪芹"),
        _p("fact", "一个足球队上场有几名球员？", "11", "十一"),
        _p("fact", "猫通常怎么叫？", "喵"),
        _p("fact", "我们居住的星球叫什么？", "地球"),
        _p("fact", "端午节通常吃什么？", "粽子"),
        _p("fact", "中秋节通常吃什么？", "月饼"),
        _p("fact", "一小时有多少分钟？", "60", "六十"),
        _p("fact", "自行车有几个轮子？", "2", "两", "二"),
        _p("arithmetic", "12加7等于多少？", "19", "十九"),
        _p("arithmetic", "6乘以7等于多少？", "42", "四十二"),
        _p("arithmetic", "50减去18等于多少？", "32", "三十二"),
        _p("arithmetic", "36除以6等于多少？", "6", "六"),
        _p("arithmetic", "3加4再加5等于多少？", "12", "十二"),
        _p("arithmetic", "10的平方是多少？", "100", "一百"),
        _p("arithmetic", "30的一半是多少？", "15", "十五"),
        _p("arithmetic", "8乘以8等于多少？", "64", "六十四"),
        _p("arithmetic", "小明有5个苹果，吃掉了2个，还剩几个？", "3", "三"),
        _p("arithmetic", "1000减1等于多少？", "999", "九百九十九"),
        _p("translation", "把“你好”翻译成英文。", "hello"),
        _p("translation", "把“狗”翻译成英文。", "dog"),
        _p("translation", "“再见”用英语怎么说？", "goodbye", "bye"),
        _p("translation", "把“书”翻译成英文。", "book"),
        _p("translation", "英文单词“water”是什么意思？", "水"),
        _p("translation", "把“friend”翻译成中文。", "朋友"),
        _p("translation", "把“red”翻译成中文。", "红"),
        _p("translation", "“谢谢”用日语怎么说？", "ありがとう", "arigato"),
        _p("translation", "把“学校”翻译成英文。", "school"),
        _p("writing", "写一首关于春天的短诗。"),
        _p("writing", "用一句话描述秋天。"),
        _p("writing", "给我三个保持健康的小建议。"),
        _p("writing", "写一段简短的感谢老师的话。"),
        _p("writing", "用两句话描述一只小狗。"),
        _p("writing", "为一家小面包店起个名字。"),
    ],
}


def matches_expected(answer: str, expect_any: list[str]) -> bool | None:
    """Whether ``answer`` contains any of ``expect_any`` (case-insensitive); ``None`` when
    there is nothing to check (``writing`` prompts)."""
    if not expect_any:
        return None
    low = answer.casefold()
    return any(e.casefold() in low for e in expect_any)
