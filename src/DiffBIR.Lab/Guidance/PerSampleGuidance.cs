using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Guidance;

/// <summary>
/// Restoration guidance with its own settings per sample of one batch: sample n is guided by
/// <see cref="Members"/>[n] (its scale s, schedule f(t), window, loss kind, gradient-map patch size and
/// normalisation), so that points of a sweep that differ only in those settings run as one batch through UNet and
/// ControlNet. Because the guidance loss is a sum over the batch of per-sample terms (Σ_n mean_CHW), the gradient of
/// sample n depends on sample n's term only: slicing the batch and applying each member to its sample gives exactly
/// the one-at-a-time gradients (the batched networks add only float rounding). A member whose window does not
/// contain t contributes a zero gradient and no loss at that step.
/// <para>Space and repeat count must agree (they shape the guide loop: one decode of the whole batch per repeat).
/// The composite's own window is the union of the members' (the guide runs when any member is active) and its
/// <see cref="RestorationGuidance.Scale"/> the largest member scale (for messages only).</para>
/// </summary>
public sealed class PerSampleGuidance : RestorationGuidance
{
    public IReadOnlyList<RestorationGuidance> Members { get; }
    readonly double[] _lossSum;
    readonly int[] _lossCount;

    public PerSampleGuidance(IEnumerable<RestorationGuidance> members)
    {
        Members = members.ToArray();
        if (Members.Count == 0) throw new ArgumentException("per-sample guidance needs at least one member");
        if (Members.Any(m => m is PerSampleGuidance)) throw new ArgumentException("per-sample guidance members cannot themselves be per-sample");
        var first = Members[0];
        if (Members.Any(m => m.Space != first.Space))
            throw new ArgumentException("per-sample guidance members must share the guidance space (rgb or latent)");
        if (Members.Any(m => m.Repeat != first.Repeat))
            throw new ArgumentException("per-sample guidance members must share the repeat count");
        Space = first.Space;
        Repeat = first.Repeat;
        TStart = Members.Max(m => m.TStart);
        TStop = Members.Min(m => m.TStop);
        Scale = Members.Max(m => m.Scale);
        _lossSum = new double[Members.Count];
        _lossCount = new int[Members.Count];
    }

    /// <summary>Σ_n L_n(target_n, pred_n) over the members active or not (the differentiable loss of the batch).</summary>
    public override Tensor Loss(Tensor target, Tensor pred)
    {
        CheckBatch(pred);
        Tensor? total = null;
        for (int n = 0; n < Members.Count; n++)
        {
            var l = Members[n].Loss(Slice(target, n), pred.narrow(0, n, 1));
            total = total is null ? l : total + l;
        }
        return total!;
    }

    /// <summary>Each member's gradient on its own sample, concatenated; the loss is the sum of the active members'.</summary>
    public override (Tensor G, double Loss) Gradient(Tensor target, Tensor pred, int t)
    {
        CheckBatch(pred);
        using var scope = torch.NewDisposeScope();
        var parts = new Tensor[Members.Count];
        double loss = 0;
        for (int n = 0; n < Members.Count; n++)
        {
            var p = pred.narrow(0, n, 1);
            if (!Members[n].IsActive(t)) { parts[n] = torch.zeros_like(p); continue; }
            var (g, l) = Members[n].Gradient(Slice(target, n), p, t);
            parts[n] = g;
            loss += l;
            _lossSum[n] += l; _lossCount[n]++;
        }
        return (torch.cat(parts, 0).MoveToOuterDisposeScope(), loss);
    }

    /// <summary>
    /// Per sample, the mean loss of the gradient evaluations since the last call (the repeats of the last guided step
    /// when called from a step observer: what a one-at-a-time run reports as its step's loss), null for a member that
    /// was not active; then starts over.
    /// </summary>
    public double?[] TakeSampleLosses()
    {
        var r = new double?[Members.Count];
        for (int n = 0; n < r.Length; n++)
        {
            r[n] = _lossCount[n] == 0 ? null : _lossSum[n] / _lossCount[n];
            _lossSum[n] = 0; _lossCount[n] = 0;
        }
        return r;
    }

    void CheckBatch(Tensor pred)
    {
        if (pred.shape[0] != Members.Count)
            throw new ArgumentException($"per-sample guidance has {Members.Count} members but the batch holds {pred.shape[0]} samples");
    }

    // the target may be one image for the whole batch (broadcast) or one per sample
    Tensor Slice(Tensor target, int n) => target.shape[0] == 1 ? target : target.narrow(0, n, 1);
}
