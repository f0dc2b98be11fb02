"""placeholder"""
class VisionLanguageModel: pass
