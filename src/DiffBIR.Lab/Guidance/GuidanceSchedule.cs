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

    /// <summary>
    /// A schedule from its text form (the CLI's <c>--g-schedule</c>): <c>constant</c> (null: f = 1), <c>linear:A:B</c>,
    /// <c>cosine:A:B</c> or <c>piecewise:T=F,T=F,…</c>. Anything else is a <see cref="FormatException"/> naming the forms.
    /// </summary>
    public static GuidanceSchedule? Parse(string spec)
    {
        static double D(string x) => double.Parse(x, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture);
        var parts = spec.Split(':');
        try
        {
            return parts[0] switch
            {
                "constant" when parts.Length == 1 => null,
                "linear" when parts.Length == 3 => Linear(D(parts[1]), D(parts[2])),
                "cosine" when parts.Length == 3 => Cosine(D(parts[1]), D(parts[2])),
                "piecewise" when parts.Length == 2 => Piecewise(parts[1].Split(',').Select(p => p.Split('='))
                    .Select(kv => kv.Length == 2 ? (int.Parse(kv[0], System.Globalization.CultureInfo.InvariantCulture), D(kv[1])) : throw new FormatException()).ToArray()),
                _ => throw new FormatException(),
            };
        }
        catch (Exception e) when (e is FormatException or OverflowException or IndexOutOfRangeException)
        {
            throw new FormatException($"'{spec}' is not a guidance schedule: expected constant, linear:A:B, cosine:A:B or piecewise:T=F,T=F,…");
        }
    }

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
