using DiffBIR.Lab.Parity;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>
/// Replays the draws a training fixture recorded (<c>__metadata__.draws</c>: <c>{kind, tensor, shape, what}</c> in
/// call order, tensors <c>in.draw.NNN</c>). A draw of another kind or shape than the recorded one, or one more
/// than was recorded, is an error naming both; <see cref="Remaining"/> tells whether every draw was used.
/// </summary>
public sealed class ReplayTrainingDraws : ITrainingDraws
{
    readonly List<(string Kind, Tensor Value, string What)> _draws = new();
    readonly string _source;
    public int Used { get; private set; }
    public int Count => _draws.Count;
    public int Remaining => _draws.Count - Used;

    public ReplayTrainingDraws(IEnumerable<(string Kind, Tensor Value, string What)> draws, string source)
    {
        _draws.AddRange(draws);
        _source = source;
    }

    /// <summary>The torch draws of a fixture (python/numpy draws, which carry values instead of tensors, are skipped).</summary>
    public static ReplayTrainingDraws FromFixture(Fixture f)
    {
        var list = f.MetaJson("draws")?.AsArray()
                   ?? throw new InvalidOperationException($"{f.Path}: no 'draws' in __metadata__");
        var draws = new List<(string, Tensor, string)>();
        foreach (var d in list)
        {
            var name = (string?)d!["tensor"];
            if (name is null) continue;
            draws.Add(((string)d["kind"]!, f.Get(name), (string?)d["what"] ?? name));
        }
        return new ReplayTrainingDraws(draws, f.Path);
    }

    (string Kind, Tensor Value, string What) Take(string kind, long[] shape, string what)
    {
        if (Used >= _draws.Count)
            throw new InvalidOperationException($"{_source}: draw {Used} ({kind} for {what}) requested, but only {_draws.Count} were recorded");
        var d = _draws[Used];
        if (d.Kind != kind || !d.Value.shape.SequenceEqual(shape))
            throw new InvalidOperationException(
                $"{_source}: draw {Used} was recorded as {d.Kind} [{string.Join(",", d.Value.shape)}] for '{d.What}', "
                + $"but the step asked for {kind} [{string.Join(",", shape)}] for '{what}'");
        Used++;
        return d;
    }

    public Tensor Bernoulli(long[] shape, double p, ScalarType dtype, Device device, string what) =>
        Take("bernoulli_", shape, what).Value.to(dtype).to(device);

    public Tensor Randn(long[] shape, ScalarType dtype, Device device, string what) =>
        Take("randn", shape, what).Value.to(dtype).to(device);

    public Tensor RandInt(long high, long[] shape, Device device, string what)
    {
        var v = Take("randint", shape, what).Value;
        if (v.numel() > 0 && (v.min().item<long>() < 0 || v.max().item<long>() >= high))
            throw new InvalidOperationException($"{_source}: recorded randint for '{what}' lies outside [0, {high})");
        return v.to(ScalarType.Int64).to(device);
    }

    public Tensor Rand(long[] shape, ScalarType dtype, Device device, string what) =>
        Take("rand", shape, what).Value.to(dtype).to(device);

    public Tensor Uniform(long[] shape, double low, double high, ScalarType dtype, Device device, string what)
    {
        var v = Take("uniform_", shape, what).Value;
        if (v.numel() > 0 && (v.min().item<float>() < low || v.max().item<float>() > high))
            throw new InvalidOperationException($"{_source}: recorded uniform_ for '{what}' lies outside [{low}, {high}]");
        return v.to(dtype).to(device);
    }

    public Tensor Poisson(Tensor rates, string what) =>
        Take("poisson", rates.shape, what).Value.to(rates.dtype).to(rates.device);
}
