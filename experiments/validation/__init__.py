"""The wrong-input battery: how the public API treats mistakes, each case classified."""
