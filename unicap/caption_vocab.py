"""The closed vocabulary that eval-captions reads captions with: per language, each kind's canonical values and the
phrases that name them (canonical <- phrases), the number words, and the words that introduce written text.

unicap.eval_captions builds its patterns from these tables.
"""

from __future__ import annotations

EN = {
    "colour": {
        "red": ["red"],
        "green": ["green"],
        "blue": ["blue"],
        "yellow": ["yellow"],
        "purple": ["purple", "violet"],
        "orange": ["orange"],
    },
    "shape": {
        "circle": ["circles?", "discs?", "disks?", "dots?"],
        "square": ["squares?"],
        "triangle": ["triangles?"],
        "diamond": ["diamonds?", "rhombus(?:es)?", "rhombi", "lozenges?"],
    },
    "size": {
        "small": ["small", "little", "tiny"],
        "medium": ["medium[ -]sized", "medium[ -]size", "mid[ -]sized", "medium"],
        "large": ["large", "big", "huge"],
    },
    "background": {
        "white": ["white"],
        "light grey": ["light gr[ae]y"],
        "beige": ["beige", "cream"],
        "pale blue": ["pale blue", "light blue", "baby blue"],
        "dark grey": ["dark gr[ae]y", "charcoal"],
        "grey": ["gr[ae]y"],  # plain "grey" is neither light nor dark grey: a wrong mention
    },
    "position": {
        0: ["(?:top|upper)[ -]left", "left[ -]top"],
        2: ["(?:top|upper)[ -]right", "right[ -]top"],
        6: ["(?:bottom|lower)[ -]left", "left[ -]bottom"],
        8: ["(?:bottom|lower)[ -]right", "right[ -]bottom"],
        1: ["top", "upper"],
        7: ["bottom", "lower"],
        3: ["left"],
        5: ["right"],
        4: ["center", "centre", "middle"],
    },
}
ZH = {
    "colour": {
        "red": ["红色", "红"],
        "green": ["绿色", "绿"],
        "blue": ["蓝色", "蓝"],
        "yellow": ["黄色", "黄"],
        "purple": ["紫色", "紫"],
        "orange": ["橙色", "橘色", "橙"],
    },
    "shape": {
        "circle": ["圆形", "圆圈", "圆点", "圆"],
        "square": ["正方形", "方形", "方块"],
        "triangle": ["三角形", "三角"],
        "diamond": ["菱形"],
    },
    "size": {
        "small": ["小型的", "小号的", "小的", "小型", "小"],
        "medium": ["中等大小的", "中等大小", "中等的", "中等", "中号的", "中号", "中型的", "中型"],
        "large": ["大型的", "大号的", "大的", "大型", "巨大的", "大"],
    },
    "background": {
        "white": ["白色"],
        "light grey": ["浅灰色", "淡灰色"],
        "beige": ["米色", "米黄色"],
        "pale blue": ["淡蓝色", "浅蓝色"],
        "dark grey": ["深灰色"],
        "grey": ["灰色"],
    },
    "position": {
        0: ["左上角", "左上方", "左上部", "左上"],
        2: ["右上角", "右上方", "右上部", "右上"],
        6: ["左下角", "左下方", "左下部", "左下"],
        8: ["右下角", "右下方", "右下部", "右下"],
        1: ["正上方", "上方", "顶部", "上部", "上面"],
        7: ["正下方", "下方", "底部", "下部", "下面"],
        3: ["左侧", "左边", "左方", "左部"],
        5: ["右侧", "右边", "右方", "右部"],
        4: ["正中央", "中央", "中间", "中心", "正中"],
    },
}
EN_NUMBERS = dict(a=1, an=1, one=1, single=1, two=2, three=3, four=4, five=5, six=6, seven=7, eight=8, nine=9, ten=10)
ZH_NUMBERS = {
    "一": 1,
    "两": 2,
    "二": 2,
    "俩": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
    "十": 10,
}
EN_MARKERS = r"words?|text|written|writing|letters|lettering|reads|says|inscription|spelled|spelling"
ZH_MARKERS = r"单词|文字|字样|写着|写有|字母|标语"
