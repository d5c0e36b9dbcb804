"""The doctor benchmark: does the top-ranked repair make a pathological run healthy and accurate, within one training run?"""
