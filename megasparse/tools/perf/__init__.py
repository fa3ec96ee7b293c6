"""megasparse.tools.perf: the op recorder, the fake ops it runs on and the roofline that times them."""
