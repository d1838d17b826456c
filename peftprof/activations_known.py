"""The activation names transformers accepts in a config's hidden_act (the keys of transformers/activations.py
ACT2FN, transformers 5.24), kept as a static tuple so the loader checks them without importing torch;
tests/test_vision.py checks it equals ACT2FN's keys."""

ACT_KEYS = ("hidden_act", "hidden_activation", "activation_function")  # the config keys that name one
KNOWN_ACTIVATIONS = ("gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_python_tanh",
                     "gelu_pytorch_tanh", "hardswish", "laplace", "leaky_relu", "linear", "mish", "prelu",
                     "quick_gelu", "relu", "relu2", "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh",
                     "xielu")
