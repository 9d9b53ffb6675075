"""The class splits of Meta-Dataset (Triantafillou et al., 2020) for the datasets metarun loads besides its own.

Copied from the specification files of google-research/meta-dataset
(``meta_dataset/dataset_conversion/splits/<dataset>_splits.json``, whose keys
are ``train``, ``valid`` and ``test``), in their order: Meta-Dataset numbers a
dataset's classes train first, then validation, then test, in these lists'
order. Those files were drawn once by ``gen_rand_split_inds`` (70% / 15% / 15%
of the classes, unseeded NumPy) and then frozen, so only the lists, not the
procedure, reproduce the benchmark.

* aircraft: FGVC-Aircraft's variants (``data/variants.txt``), 70 / 15 / 15;
* vgg_flower: Oxford 102 Flowers' labels 1-102 (``imagelabels.mat``), 71 / 15 / 16;
  class names are ``"%03d.%s"`` of the label and :data:`FLOWER_NAMES`
  (Meta-Dataset's ``VggFlower_labels.txt``);
* dtd: the Describable Textures' folder names, 33 / 7 / 7;
* quickdraw: the names of the ``<name>.npy`` bitmap files, 241 / 52 / 52;
* fungi: FGVCx Fungi 2018's category ids (``train.json``), 994 / 200 / 200; the
  published file names each class ``"%04d.%s"`` of id and name, and its
  validation and test ids are listed here in full (the training classes are
  every other id, 0-1393);
* traffic_sign: GTSRB's 43 classes, all test (0 / 0 / 43), named ``"%02d.%s"``
  of the class number and :data:`TRAFFIC_SIGN_NAMES` (Meta-Dataset's
  ``TrafficSign_labels.txt``).
"""

from __future__ import annotations

AIRCRAFT: dict[str, tuple[str, ...]] = {
    "train": (
        "A340-300", "A318", "Falcon 2000", "F-16A/B", "F/A-18", "C-130", "MD-80", "BAE 146-200", "777-200",
        "747-400", "Cessna 172", "An-12", "A330-300", "A321", "Fokker 100", "Fokker 50", "DHC-1", "Fokker 70",
        "A340-200", "DC-6", "747-200", "Il-76", "747-300", "Model B200", "Saab 340", "Cessna 560", "Dornier 328",
        "E-195", "ERJ 135", "747-100", "737-600", "C-47", "DR-400", "ATR-72", "A330-200", "727-200", "737-700",
        "PA-28", "ERJ 145", "737-300", "767-300", "737-500", "737-200", "DHC-6", "Falcon 900", "DC-3",
        "Eurofighter Typhoon", "Challenger 600", "Hawk T1", "A380", "777-300", "E-190", "DHC-8-100", "Cessna 525",
        "Metroliner", "EMB-120", "Tu-134", "Embraer Legacy 600", "Gulfstream IV", "Tu-154", "MD-87", "A300B4",
        "A340-600", "A340-500", "MD-11", "707-320", "Cessna 208", "Global Express", "A319", "DH-82",
    ),
    "val": (
        "737-900", "757-300", "767-200", "A310", "A320", "BAE 146-300", "CRJ-900", "DC-10", "DC-8", "DC-9-30",
        "DHC-8-300", "Gulfstream V", "SR-20", "Tornado", "Yak-42",
    ),
    "test": (
        "737-400", "737-800", "757-200", "767-400", "ATR-42", "BAE-125", "Beechcraft 1900", "Boeing 717", "CRJ-200",
        "CRJ-700", "E-170", "L-1011", "MD-90", "Saab 2000", "Spitfire",
    ),
}  # fmt: skip

FLOWER_NAMES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia?", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)  # fmt: skip

VGG_FLOWER: dict[str, tuple[int, ...]] = {
    "train": (
        90, 38, 80, 30, 29, 12, 43, 27, 4, 64, 31, 99, 8, 67, 95, 77, 78, 61, 88, 74, 55, 32, 21, 13, 79, 70, 51, 69,
        14, 60, 11, 39, 63, 37, 36, 28, 48, 7, 93, 2, 18, 24, 6, 3, 44, 76, 75, 72, 52, 84, 73, 34, 54, 66, 59, 50,
        91, 68, 100, 71, 81, 101, 92, 22, 33, 87, 1, 49, 20, 25, 58,
    ),
    "val": (
        10, 16, 17, 23, 26, 47, 53, 56, 57, 62, 82, 83, 86, 97, 102,
    ),
    "test": (
        5, 9, 15, 19, 35, 40, 41, 42, 45, 46, 65, 85, 89, 94, 96, 98,
    ),
}  # fmt: skip

DTD: dict[str, tuple[str, ...]] = {
    "train": (
        "chequered", "braided", "interlaced", "matted", "honeycombed", "marbled", "veined", "frilly", "zigzagged",
        "cobwebbed", "pitted", "waffled", "fibrous", "flecked", "grooved", "potholed", "blotchy", "stained",
        "crystalline", "dotted", "striped", "swirly", "meshed", "bubbly", "studded", "pleated", "lacelike",
        "polka-dotted", "perforated", "freckled", "smeared", "cracked", "wrinkled",
    ),
    "val": (
        "gauzy", "grid", "lined", "paisley", "porous", "scaly", "spiralled",
    ),
    "test": (
        "banded", "bumpy", "crosshatched", "knitted", "sprinkled", "stratified", "woven",
    ),
}  # fmt: skip

QUICKDRAW: dict[str, tuple[str, ...]] = {
    "train": (
        "hedgehog", "swan", "police car", "castle", "horse", "stairs", "van", "screwdriver", "marker", "duck",
        "oven", "dolphin", "stove", "ambulance", "basket", "popsicle", "whale", "alarm clock", "crown", "teapot",
        "octagon", "school bus", "potato", "eyeglasses", "diamond", "bowtie", "cat", "The Eiffel Tower", "hurricane",
        "square", "river", "door", "triangle", "pear", "cup", "elephant", "compass", "tractor", "ladder",
        "pineapple", "bathtub", "tiger", "drums", "cake", "ceiling fan", "zigzag", "light bulb", "sheep",
        "flip flops", "sailboat", "sink", "necklace", "toothbrush", "snorkel", "trombone", "watermelon", "pliers",
        "camera", "cruise ship", "string bean", "raccoon", "rainbow", "fork", "fan", "fence", "microphone",
        "motorbike", "pool", "line", "bandage", "bracelet", "syringe", "windmill", "lollipop", "grass", "airplane",
        "sword", "boomerang", "telephone", "guitar", "bed", "paint can", "sandwich", "sock", "tent", "stop sign",
        "scorpion", "toothpaste", "squiggle", "The Great Wall of China", "hot tub", "bottlecap", "mug",
        "baseball bat", "belt", "sun", "rake", "pillow", "parachute", "foot", "pencil", "traffic light", "underwear",
        "calculator", "blackberry", "shark", "nail", "ear", "cloud", "lighthouse", "lightning", "rain",
        "The Mona Lisa", "apple", "shorts", "star", "clock", "sea turtle", "bicycle", "fireplace", "lighter",
        "squirrel", "chandelier", "cannon", "paintbrush", "tree", "jail", "pants", "envelope", "onion", "pizza",
        "sleeping bag", "lipstick", "dragon", "t-shirt", "snowflake", "hot air balloon", "cooler", "peas", "skull",
        "dresser", "harp", "garden", "leaf", "camouflage", "house plant", "see saw", "megaphone", "map", "penguin",
        "dog", "peanut", "keyboard", "strawberry", "truck", "car", "pig", "crayon", "headphones", "floor lamp",
        "hamburger", "wine glass", "beach", "ocean", "circle", "asparagus", "remote control", "moon", "rifle",
        "shovel", "hospital", "barn", "picture frame", "scissors", "crab", "moustache", "brain", "lion", "banana",
        "chair", "skateboard", "book", "mushroom", "shoe", "key", "passport", "broccoli", "elbow", "leg", "dumbbell",
        "bird", "cello", "hockey puck", "submarine", "canoe", "rhinoceros", "bush", "flying saucer", "arm", "frog",
        "train", "dishwasher", "washing machine", "swing set", "aircraft carrier", "vase", "crocodile", "monkey",
        "blueberry", "cell phone", "toe", "garden hose", "zebra", "hexagon", "owl", "postcard", "speedboat",
        "mosquito", "birthday cake", "pickup truck", "hand", "computer", "piano", "fish", "soccer ball", "bear",
        "mouth", "face", "violin", "bench", "stereo", "jacket", "spreadsheet", "power outlet", "knee", "mountain",
        "octopus", "laptop", "snail", "flamingo", "spoon",
    ),
    "val": (
        "ant", "anvil", "backpack", "baseball", "basketball", "binoculars", "bread", "bulldozer", "bus", "calendar",
        "camel", "candle", "carrot", "church", "clarinet", "coffee cup", "eye", "firetruck", "flower", "golf club",
        "grapes", "hat", "hot dog", "ice cream", "knife", "lobster", "matches", "mermaid", "microwave", "nose",
        "panda", "paper clip", "pond", "purse", "radio", "roller coaster", "skyscraper", "smiley face", "snake",
        "steak", "stethoscope", "suitcase", "teddy-bear", "television", "tennis racquet", "toaster", "toilet",
        "tooth", "tornado", "trumpet", "waterslide", "wristwatch",
    ),
    "test": (
        "angel", "animal migration", "axe", "bat", "beard", "bee", "bridge", "broom", "bucket", "butterfly",
        "cactus", "campfire", "cookie", "couch", "cow", "diving board", "donut", "drill", "eraser", "feather",
        "finger", "fire hydrant", "flashlight", "frying pan", "giraffe", "goatee", "hammer", "helicopter", "helmet",
        "hockey stick", "hourglass", "house", "kangaroo", "lantern", "mailbox", "mouse", "palm tree", "parrot",
        "rabbit", "rollerskates", "saw", "saxophone", "snowman", "spider", "stitches", "streetlight", "sweater",
        "table", "umbrella", "wheel", "wine bottle", "yoga",
    ),
}  # fmt: skip

FUNGI_CATEGORIES = 1394
FUNGI_VAL: tuple[int, ...] = (
    0, 4, 6, 15, 22, 28, 32, 36, 45, 58, 61, 64, 71, 73, 80, 87, 91, 95, 101, 102, 104, 110, 117, 121, 126, 134, 138,
    142, 148, 149, 152, 159, 162, 163, 209, 217, 224, 227, 229, 231, 236, 258, 265, 273, 276, 286, 294, 296, 313,
    315, 325, 327, 328, 329, 332, 341, 353, 354, 355, 357, 366, 369, 370, 371, 374, 378, 389, 396, 401, 409, 410,
    414, 417, 418, 425, 430, 435, 463, 464, 466, 470, 494, 496, 520, 533, 534, 537, 552, 555, 561, 565, 567, 583,
    592, 602, 605, 607, 622, 624, 641, 649, 653, 658, 659, 667, 684, 694, 698, 702, 705, 706, 712, 715, 718, 730,
    731, 741, 743, 755, 780, 788, 800, 802, 815, 827, 845, 848, 862, 865, 866, 873, 880, 884, 888, 892, 901, 905,
    910, 932, 948, 949, 968, 970, 973, 977, 991, 994, 996, 1006, 1008, 1014, 1016, 1019, 1026, 1027, 1028, 1036,
    1043, 1057, 1075, 1092, 1097, 1106, 1110, 1123, 1126, 1134, 1137, 1143, 1145, 1150, 1151, 1153, 1173, 1199, 1203,
    1214, 1224, 1228, 1230, 1233, 1237, 1240, 1242, 1247, 1255, 1257, 1261, 1278, 1279, 1294, 1320, 1321, 1328, 1341,
    1350, 1354, 1363, 1375, 1379,
)  # fmt: skip
FUNGI_TEST: tuple[int, ...] = (
    8, 9, 19, 38, 44, 53, 55, 62, 63, 69, 70, 78, 93, 96, 99, 103, 105, 118, 129, 132, 141, 151, 153, 156, 165, 175,
    176, 179, 184, 190, 205, 220, 223, 232, 234, 247, 277, 279, 289, 291, 316, 321, 326, 356, 359, 381, 382, 390,
    393, 395, 397, 408, 413, 431, 433, 444, 453, 457, 460, 462, 472, 479, 482, 484, 491, 492, 498, 501, 502, 505,
    517, 535, 536, 539, 541, 574, 580, 584, 587, 596, 600, 604, 609, 616, 618, 620, 627, 637, 651, 661, 674, 677,
    680, 688, 695, 703, 713, 722, 724, 726, 727, 729, 742, 760, 764, 765, 784, 787, 790, 792, 799, 803, 805, 807,
    812, 817, 820, 826, 834, 838, 849, 853, 857, 871, 885, 893, 904, 907, 909, 914, 915, 917, 935, 937, 938, 940,
    947, 955, 960, 963, 966, 971, 976, 987, 989, 997, 999, 1012, 1018, 1024, 1030, 1031, 1032, 1033, 1034, 1062,
    1076, 1077, 1084, 1086, 1094, 1096, 1098, 1104, 1105, 1107, 1111, 1115, 1117, 1120, 1129, 1133, 1157, 1165, 1169,
    1194, 1231, 1234, 1238, 1249, 1250, 1253, 1262, 1264, 1265, 1273, 1280, 1299, 1305, 1314, 1318, 1344, 1348, 1352,
    1362, 1366, 1373, 1376, 1382, 1388,
)  # fmt: skip
FUNGI: dict[str, tuple[int, ...]] = {
    "train": tuple(sorted(set(range(FUNGI_CATEGORIES)) - set(FUNGI_VAL) - set(FUNGI_TEST))),
    "val": FUNGI_VAL,
    "test": FUNGI_TEST,
}

TRAFFIC_SIGN_NAMES: tuple[str, ...] = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left", "Roundabout mandatory",
    "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
)  # fmt: skip
