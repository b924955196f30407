namespace DiffBIR.Lab.Guidance;

/// <summary>
/// A factor f(t) of the guidance scale over the sampling run, for the model timestep t (999 = noisiest … 0 = clean):
/// the scale in effect is s(t) = s · f(t), s being <see cref="RestorationGuidance.Scale"/> (so `--g-scale 0.5
/// --g-schedule linear:0:1` ramps from 0 to 0.5). The official code has only a constant s inside a
/// [t_stop, t_start] window; these are the extensions.
/// </summary>
public sealed class GuidanceSchedule
{
    readonly Func<int, double> _f;
    public string Description { get; }

    public GuidanceSchedule(Func<int, double> f, string description = "custom") { _f = f; Description = description; }

    public double At(int t) => _f(t);

    public static implicit operator GuidanceSchedule(Func<int, double> f) => new(f);

    public static GuidanceSchedule Constant(double s) => new(_ => s, $"constant {s}");

    /// <summary>Linear in t: <paramref name="atNoisy"/> at t = T−1 (999) to <paramref name="atClean"/> at t = 0.</summary>
    public static GuidanceSchedule Linear(double atNoisy, double atClean, int timesteps = 1000) =>
        new(t => atClean + (atNoisy - atClean) * t / (timesteps - 1.0), $"linear {atNoisy}→{atClean}");

    /// <summary>Cosine ease from <paramref name="atNoisy"/> (t = T−1) to <paramref name="atClean"/> (t = 0):
    /// s = atClean + (atNoisy − atClean)·(1 − cos(π·t/(T−1)))/2.</summary>
    public static GuidanceSchedule Cosine(double atNoisy, double atClean, int timesteps = 1000) =>
        new(t => atClean + (atNoisy - atClean) * (1 - Math.Cos(Math.PI * t / (timesteps - 1.0))) / 2, $"cosine {atNoisy}→{atClean}");

    /// <summary>Piecewise constant: each (fromT, s) applies for t ≥ fromT down to the next boundary; pieces are
    /// sorted by fromT descending; below the last boundary the last scale holds.</summary>
    public static GuidanceSchedule Piecewise(params (int FromT, double Scale)[] pieces)
    {
        var sorted = pieces.OrderByDescending(p => p.FromT).ToArray();
        if (sorted.Length == 0) throw new ArgumentException("piecewise schedule needs at least one piece");
        return new(t =>
        {
            foreach (var p in sorted) if (t >= p.FromT) return p.Scale;
            return sorted[^1].Scale;
        }, "piecewise " + string.Join(", ", sorted.Select(p => $"t≥{p.FromT}:{p.Scale}")));
    }
}
