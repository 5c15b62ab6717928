"""Training recipes: settings, the registry of methods (prepare / train / finalize), the runner."""
from gift_quant.train.methods import METHODS, Method, register_method
from gift_quant.train.recipe import Recipe, load_recipe
from gift_quant.train.runner import RecipeResult, run_recipe
from gift_quant.train.settings import TrainSettings

__all__ = ["METHODS", "Method", "Recipe", "RecipeResult", "TrainSettings", "load_recipe", "register_method",
           "run_recipe"]
