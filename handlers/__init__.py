"""The TorchServe handler that servetool copies into every .mar.

It must import nothing from servetool: an archive runs on a stock TorchServe. Inside an archive this
package sits at the archive root beside entry.py, the handler TorchServe loads.
"""
