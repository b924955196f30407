using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using System.Text.Json;

namespace DiffBIR.Lab.Weights;

/// <summary>A download failed; the message names the file, the URL and the cause, and what to do next.</summary>
public sealed class WeightsFetchException : Exception
{
    public WeightsFetchException(string message, Exception? inner = null) : base(message, inner) { }
}

/// <summary>Progress of one file: bytes so far and the total when the server says it.</summary>
public sealed record FetchProgress(WeightFile File, long Bytes, long? Total, bool Resumed);

/// <summary>What happened to one file.</summary>
public sealed record FetchResult(WeightFile File, string Path, string Sha256, long Bytes, bool AlreadyPresent, bool Resumed);

/// <summary>
/// Downloads the official checkpoints named in weights/manifest.json — the only code in DiffBIR.Lab that uses the
/// network, and only when asked (<c>diffbir-lab weights fetch</c>). Downloads go to <c>FILE.part</c> and resume from
/// there (HTTP Range) after a cut connection; the file is moved into place only after its size and SHA-256 match
/// the manifest. Where the manifest has no checksum yet, the one computed on first download is kept in
/// <c>checksums.json</c> beside the weights and enforced from then on.
/// </summary>
public sealed class WeightsFetcher
{
    readonly HttpClient _http;
    readonly string _folder;

    public WeightsFetcher(string folder, HttpClient? http = null)
    {
        _folder = folder;
        _http = http ?? new HttpClient { Timeout = Timeout.InfiniteTimeSpan };
    }

    string ChecksumsPath => Path.Combine(_folder, "checksums.json");

    Dictionary<string, string> LocalChecksums() =>
        File.Exists(ChecksumsPath)
            ? JsonSerializer.Deserialize<Dictionary<string, string>>(File.ReadAllText(ChecksumsPath)) ?? new()
            : new();

    /// <summary>The checksum a file must have: the manifest's, else the one recorded on its first download.</summary>
    public string? ExpectedSha256(WeightFile f) => f.Sha256 ?? (LocalChecksums().TryGetValue(f.File, out var s) ? s : null);

    public async Task<FetchResult> FetchAsync(WeightFile f, IProgress<FetchProgress>? progress = null, CancellationToken ct = default)
    {
        Directory.CreateDirectory(_folder);
        var target = Path.Combine(_folder, f.File);
        var part = target + ".part";
        var expected = ExpectedSha256(f);
        if (File.Exists(target))
        {
            var have = await HashFileAsync(target, ct);
            if (expected == null || string.Equals(have, expected, StringComparison.OrdinalIgnoreCase))
                return new FetchResult(f, target, have, new FileInfo(target).Length, true, false);
            throw new WeightsFetchException($"{target}: SHA-256 {have} does not match the expected {expected}; delete the file and fetch again");
        }

        long start = File.Exists(part) ? new FileInfo(part).Length : 0;
        using var req = new HttpRequestMessage(HttpMethod.Get, f.Url);
        if (start > 0) req.Headers.Range = new RangeHeaderValue(start, null);
        HttpResponseMessage resp;
        try { resp = await _http.SendAsync(req, HttpCompletionOption.ResponseHeadersRead, ct); }
        catch (HttpRequestException e)
        { throw new WeightsFetchException($"{f.File}: cannot reach {new Uri(f.Url).Host} ({e.Message}). Are you offline? Download {f.Url} by hand into {_folder}/ instead.", e); }
        using (resp)
        {
            if (resp.StatusCode == HttpStatusCode.RequestedRangeNotSatisfiable) { File.Delete(part); start = 0; return await FetchAsync(f, progress, ct); }
            if (!resp.IsSuccessStatusCode)
                throw new WeightsFetchException($"{f.File}: {f.Url} answered {(int)resp.StatusCode} {resp.ReasonPhrase}");
            bool resumed = start > 0 && resp.StatusCode == HttpStatusCode.PartialContent;
            if (!resumed) start = 0; // the server ignored the range: start over
            long? total = resp.Content.Headers.ContentLength is long len ? start + len : f.SizeBytes;
            await using (var src = await resp.Content.ReadAsStreamAsync(ct))
            await using (var dst = new FileStream(part, resumed ? FileMode.Append : FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
            {
                var buf = new byte[1 << 20];
                long done = start;
                int n;
                try
                {
                    while ((n = await src.ReadAsync(buf, ct)) > 0)
                    {
                        await dst.WriteAsync(buf.AsMemory(0, n), ct);
                        done += n;
                        progress?.Report(new FetchProgress(f, done, total, resumed));
                    }
                }
                catch (Exception e) when (e is IOException or HttpRequestException)
                {
                    throw new WeightsFetchException($"{f.File}: the connection broke after {done:N0} bytes ({e.Message}); run the same command again to resume", e);
                }
                await dst.FlushAsync(ct);
            }
            var size = new FileInfo(part).Length;
            if (f.SizeBytes is long want && size != want)
            {
                File.Delete(part);
                throw new WeightsFetchException($"{f.File}: got {size:N0} bytes, expected {want:N0}; the partial download was removed, fetch again");
            }
            var sha = await HashFileAsync(part, ct);
            if (expected != null && !string.Equals(sha, expected, StringComparison.OrdinalIgnoreCase))
            {
                File.Delete(part);
                throw new WeightsFetchException($"{f.File}: SHA-256 {sha} does not match the expected {expected}; the download was discarded");
            }
            File.Move(part, target, overwrite: false);
            if (expected == null)
            {
                var sums = LocalChecksums();
                sums[f.File] = sha;
                AtomicFile.WriteAllText(ChecksumsPath, JsonSerializer.Serialize(sums, new JsonSerializerOptions { WriteIndented = true }));
            }
            return new FetchResult(f, target, sha, size, false, resumed);
        }
    }

    public static async Task<string> HashFileAsync(string path, CancellationToken ct = default)
    {
        await using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20, useAsync: true);
        var hash = await SHA256.HashDataAsync(fs, ct);
        return Convert.ToHexStringLower(hash);
    }
}
