"""notary"""
