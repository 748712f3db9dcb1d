"""The jobs a user runs: fine-tune a task, distil a compensator, evaluate degrees, the demo.

Each job composes the layers below (models, peft, compensator, pyra, data) with the training
loop of :mod:`tocom.train`; the command line is a thin layer over these functions.
"""
