"""How gradients are computed: every custom backward and gradient sweep gradxform has, in one place.

Each engine is plain PyTorch maths over modules and tensors handed to it: reversible chains
(inversion + recompute + VJP), Highway-BP (parallel block VJPs and a suffix scan), forward gradients
(JVPs along guesses), Moonwalk (vector-inverse-Jacobian products), F³ feedback. This package imports
neither the passes nor the runtime: ``gradxform.nn`` wraps the engines in modules, passes insert those
modules, the runtime drives them.
"""
