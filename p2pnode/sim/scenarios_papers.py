"""What each paper reports for the rows of the named scenarios, with the source.

Only figures that were found in the papers' own text are given as values; where the paper's number
could not be found here, the value is ``"not found"`` and the note says what the paper claims
qualitatively (from its abstract). No number is guessed.
"""

from __future__ import annotations

from p2pnode.sim.scenarios_common import PaperFigure

MONNA = "Farhadkhani et al., Robust Collaborative Learning with Linear Gradient Overhead (ICML 2023)"
SYBILWALL = "Werthenbach & Pouwelse, Towards Sybil Resilience in Decentralized Learning (arXiv 2306.15044)"
BRISTLE = ("Verbraeken, de Vos & Pouwelse, Bristle: Decentralized Federated Learning in Byzantine, "
           "Non-i.i.d. Environments (arXiv 2110.11006)")
TIAN = ("Tian et al., Vanishing Variance Problem in Fully Decentralized Neural-Network Systems "
        "(arXiv 2404.04616)")
DISASTER = ("Palmieri et al., Exploring the Impact of Disrupted Peer-to-Peer Communications on Fully "
            "Decentralized Learning in Disaster Scenarios (arXiv 2310.02986)")

_MONNA_NOTE = ("the paper plots MNIST test accuracy curves (n = 26, f = 5, Dirichlet alpha 1 and 5, "
               "600 steps, per the authors' reproduce.py); no table value was found here. Claim "
               "(abstract): MoNNA stays robust under these attacks with gradient overhead linear in f")


def monna(row: str) -> PaperFigure:
    if row.startswith("D-SGD"):
        return PaperFigure("not found", f"{MONNA}, D-SGD curve in the attack figures", _MONNA_NOTE)
    return PaperFigure("not found", f"{MONNA}, MNIST figures (MoNNA curve)", _MONNA_NOTE)


def sybilwall(row: str) -> PaperFigure:
    return PaperFigure("not found", f"{SYBILWALL}, evaluation section",
                       "claim (abstract): SybilWall is the only evaluated algorithm with consistent accuracy "
                       "over the attack scenarios, and adversaries with fewer Sybils had a higher success "
                       "rate")


def bristle(row: str) -> PaperFigure:
    if row.startswith("bristle") and "flipper" in row:
        return PaperFigure("~95% accuracy (their dataset)", f"{BRISTLE}, abstract",
                           "Bristle 'converges to a consistent 95% accuracy in Byzantine environments'")
    if "flipper" in row:  # mean and the robust baselines
        return PaperFigure("not found", f"{BRISTLE}, abstract",
                           "with non-i.i.d. classes Bristle beats the most Byzantine-resilient baselines by "
                           "2.3x in accuracy (abstract); no per-rule figure found")
    return PaperFigure("not found", f"{BRISTLE}, abstract",
                       "no-attack: 'requires 83% fewer iterations to achieve 90% accuracy' than state of "
                       "the art")


def vanishing_variance(row: str) -> PaperFigure:
    return PaperFigure("not found", f"{TIAN}, simulation results",
                       "claim (abstract): with variance-corrected averaging gossip learning reaches "
                       "'convergence efficiency comparable to that of federated learning'; plain averaging "
                       "of uncorrelated models delays convergence")


def disaster(row: str) -> PaperFigure:
    return PaperFigure("not found", f"{DISASTER}, results on a Barabasi-Albert graph, IID data",
                       "claim (abstract): accuracy suffers more from a loss of connectivity than from a loss "
                       "of data, and the network stays relatively robust (good accuracy after the "
                       "disruption)")


PAPERS = {"monna": monna, "sybilwall": sybilwall, "bristle": bristle,
          "vanishing-variance": vanishing_variance, "disaster": disaster}
