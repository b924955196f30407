using System.Globalization;
using System.IO.Compression;
using System.Net;
using System.Text;
using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.Clip;

/// <summary>
/// OpenAI CLIP's byte-level BPE tokenizer as DiffBIR ships it (official
/// <c>diffbir/model/open_clip/tokenizer.py</c>, <c>SimpleTokenizer</c> + <c>tokenize</c>), reading the merges from
/// <c>bpe_simple_vocab_16e6.txt.gz</c>. Vocabulary: 256 byte symbols, their 256 word-final (<c>&lt;/w&gt;</c>) forms,
/// 48,894 merges and the two specials, 49,408 ids in all.
/// </summary>
/// <remarks>
/// Text is cleaned as the official <c>basic_clean</c> → <c>whitespace_clean</c> → <c>lower()</c>, with one known
/// difference: the official code first runs <c>ftfy.fix_text</c> (mojibake repair, NFC normalisation, curly quotes
/// to straight ones, ligatures and full-width forms unfolded, control characters removed). We do not, which is what
/// the golden fixtures did too (ftfy was replaced by the identity there). Plain ASCII/Unicode prompts are unaffected;
/// text with ligatures (ﬁ), full-width letters, curly quotes, decomposed accents or mojibake tokenizes differently
/// from a stock DiffBIR install. HTML unescaping follows Python's <c>html.unescape</c> (applied twice), except that
/// named references that exist only in HTML5 (not HTML 4, e.g. <c>&amp;NewLine;</c>) are left as they are.
/// Lower-casing and the pre-tokenizer work on Unicode code points as Python does (full lower-casing of İ, final
/// sigma), so letters outside the BMP group like any other letters.
/// </remarks>
public sealed class ClipTokenizer
{
    public const int StartOfText = 49406;
    public const int EndOfText = 49407;
    /// <summary>Merges read from the vocabulary file: 49152 − 256 − 2 (official slice <c>merges[1:49152-256-2+1]</c>).</summary>
    public const int MergeCount = 49152 - 256 - 2;

    static readonly string[] Specials = { "<start_of_text>", "<end_of_text>" };
    static readonly char[] ByteEncoder = BuildByteEncoder();

    readonly Dictionary<string, int> _encoder = new(StringComparer.Ordinal);
    readonly string[] _decoder;
    readonly Dictionary<(string, string), int> _bpeRanks = new();
    readonly Dictionary<string, string> _cache = new(StringComparer.Ordinal);
    readonly object _cacheLock = new();

    public int VocabSize => _encoder.Count;

    /// <param name="bpePath">bpe_simple_vocab_16e6.txt.gz (gzip of UTF-8 lines "a b"; line 0 is a version header).</param>
    public ClipTokenizer(string bpePath) : this(ReadMerges(bpePath)) { }

    /// <summary>
    /// A tokenizer without BPE merges: every character is its own token (byte-level symbols, word ends marked). Only
    /// for networks with random weights (the tiny preset) when bpe_simple_vocab_16e6.txt.gz is not at hand: the ids are
    /// valid (&lt; 49408) and deterministic, but they are NOT the ids a trained OpenCLIP expects.
    /// </summary>
    public static ClipTokenizer ByteLevel() => new(new List<string[]>());

    static List<string[]> ReadMerges(string bpePath)
    {
        if (!File.Exists(bpePath))
            throw new FileNotFoundException($"{bpePath}: CLIP BPE vocabulary not found (bpe_simple_vocab_16e6.txt.gz from the DiffBIR/open_clip sources; see weights/README.md)", bpePath);
        string text;
        using (var gz = new GZipStream(File.OpenRead(bpePath), CompressionMode.Decompress))
        using (var reader = new StreamReader(gz, new UTF8Encoding(false, true)))
            text = reader.ReadToEnd();
        var lines = text.Split('\n');
        var merges = lines.Skip(1).Take(MergeCount)
            .Select(l => l.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries)).ToList();
        if (merges.Count != MergeCount || merges.Any(m => m.Length != 2))
            throw new InvalidDataException($"{bpePath}: expected {MergeCount} merge lines of two symbols after the header, found {merges.Count} lines" +
                                           (merges.FirstOrDefault(m => m.Length != 2) is { } bad ? $" (a bad one: '{string.Join(' ', bad)}')" : ""));
        return merges;
    }

    ClipTokenizer(List<string[]> merges)
    {
        var vocab = new List<string>(49408);
        var symbols = BytesToUnicode().Select(p => p.Symbol.ToString()).ToList();
        vocab.AddRange(symbols);
        vocab.AddRange(symbols.Select(c => c + "</w>"));
        vocab.AddRange(merges.Select(m => m[0] + m[1]));
        vocab.AddRange(Specials);
        // Python dict semantics: a repeated entry keeps the LAST index.
        for (int i = 0; i < vocab.Count; i++) _encoder[vocab[i]] = i;
        _decoder = new string[vocab.Count];
        foreach (var (k, v) in _encoder) _decoder[v] = k;
        for (int i = 0; i < merges.Count; i++) _bpeRanks[(merges[i][0], merges[i][1])] = i;
        foreach (var s in Specials) _cache[s] = s;
    }

    /// <summary>
    /// Token ids for a batch (official <c>tokenize(texts, context_length)</c>): SOT, the BPE ids, EOT, then zeros.
    /// A text that does not fit is cut to <paramref name="contextLength"/> ids and its last id replaced by EOT.
    /// </summary>
    /// <returns>int64 [N, contextLength]</returns>
    public Tensor Tokenize(IEnumerable<string> texts, int contextLength = 77)
    {
        var rows = texts.Select(t => TokenizeOne(t, contextLength)).ToList();
        var flat = new long[rows.Count * contextLength];
        for (int i = 0; i < rows.Count; i++) Array.Copy(rows[i], 0, flat, i * contextLength, contextLength);
        return torch.tensor(flat, new long[] { rows.Count, contextLength }, ScalarType.Int64);
    }

    /// <summary>One row of <see cref="Tokenize"/>.</summary>
    public long[] TokenizeOne(string text, int contextLength = 77)
    {
        var ids = new List<int> { StartOfText };
        ids.AddRange(Encode(text));
        ids.Add(EndOfText);
        if (ids.Count > contextLength)
        {
            ids.RemoveRange(contextLength, ids.Count - contextLength);
            ids[^1] = EndOfText;
        }
        var row = new long[contextLength];
        for (int i = 0; i < ids.Count; i++) row[i] = ids[i];
        return row;
    }

    /// <summary>BPE ids of a text, without SOT/EOT (official <c>SimpleTokenizer.encode</c>).</summary>
    public List<int> Encode(string text)
    {
        var ids = new List<int>();
        foreach (var word in PreTokenize(CleanText(text)))
        {
            var bytes = Encoding.UTF8.GetBytes(word);
            var mapped = new StringBuilder(bytes.Length);
            foreach (var b in bytes) mapped.Append(ByteEncoder[b]);
            foreach (var piece in Bpe(mapped.ToString()).Split(' '))
                ids.Add(_encoder.TryGetValue(piece, out var id) ? id
                    : throw new InvalidOperationException($"BPE produced '{piece}', which is not in the vocabulary"));
        }
        return ids;
    }

    /// <summary>Text back from ids (official <c>decode</c>): word ends become spaces; invalid UTF-8 becomes U+FFFD.</summary>
    public string Decode(IEnumerable<int> ids)
    {
        var s = string.Concat(ids.Select(i => _decoder[i]));
        var bytes = new List<byte>();
        foreach (var c in s) bytes.Add(ByteDecoder[c]);
        return Encoding.UTF8.GetString(bytes.ToArray()).Replace("</w>", " ");
    }

    static readonly Dictionary<char, byte> ByteDecoder = Enumerable.Range(0, 256).ToDictionary(b => ByteEncoder[b], b => (byte)b);

    // ----------------------------------------------------------------------------------------------------------
    // Cleaning: whitespace_clean(basic_clean(text)).lower()

    /// <summary>The text the BPE sees: HTML-unescaped twice, whitespace runs collapsed to one space, trimmed, lower-cased.</summary>
    public static string CleanText(string text) => PyLower(WhitespaceClean(BasicClean(text)));

    /// <summary>Official <c>basic_clean</c> without ftfy: <c>html.unescape(html.unescape(text)).strip()</c>.</summary>
    public static string BasicClean(string text) => PyStrip(HtmlUnescape(HtmlUnescape(text)));

    /// <summary>Official <c>whitespace_clean</c>: <c>regex.sub(r'\s+', ' ', text).strip()</c>.</summary>
    public static string WhitespaceClean(string text)
    {
        var sb = new StringBuilder(text.Length);
        bool inSpace = false;
        foreach (var cp in CodePoints(text))
        {
            if (IsRegexSpace(cp)) { if (!inSpace) sb.Append(' '); inSpace = true; }
            else { AppendCodePoint(sb, cp); inSpace = false; }
        }
        return PyStrip(sb.ToString());
    }

    /// <summary>
    /// <c>\s</c> of Python's <c>regex</c> module (Unicode White_Space). Python's <c>str.strip</c>/<c>isspace</c>
    /// additionally treat U+001C..U+001F as space.
    /// </summary>
    static bool IsRegexSpace(int cp) => cp is (>= 0x09 and <= 0x0D) or 0x20 or 0x85 or 0xA0 or 0x1680 or (>= 0x2000 and <= 0x200A)
        or 0x2028 or 0x2029 or 0x202F or 0x205F or 0x3000;

    static bool IsPySpace(int cp) => IsRegexSpace(cp) || cp is >= 0x1C and <= 0x1F;

    static string PyStrip(string s)
    {
        var cps = CodePoints(s).ToList();
        int a = 0, b = cps.Count;
        while (a < b && IsPySpace(cps[a])) a++;
        while (b > a && IsPySpace(cps[b - 1])) b--;
        if (a == 0 && b == cps.Count) return s;
        var sb = new StringBuilder();
        for (int i = a; i < b; i++) AppendCodePoint(sb, cps[i]);
        return sb.ToString();
    }

    /// <summary>
    /// Python's <c>str.lower()</c>: Unicode lower-case mapping per code point, plus its two context rules that a
    /// per-character mapping misses: İ (U+0130) → "i̇", and Σ → ς at the end of a word (Final_Sigma).
    /// </summary>
    public static string PyLower(string s)
    {
        var cps = CodePoints(s).ToArray();
        var sb = new StringBuilder(s.Length);
        for (int i = 0; i < cps.Length; i++)
        {
            int cp = cps[i];
            if (cp == 0x130) sb.Append("i\u0307");
            else if (cp == 0x3A3) sb.Append(IsFinalSigma(cps, i) ? 'ς' : 'σ');
            else if (cp is >= 0xD800 and <= 0xDFFF) sb.Append((char)cp);
            else sb.Append(Rune.ToLowerInvariant(new Rune(cp)).ToString());
        }
        return sb.ToString();
    }

    static bool IsFinalSigma(int[] cps, int i)
    {
        int j = i - 1;
        while (j >= 0 && IsCaseIgnorable(cps[j])) j--;
        if (j < 0 || !IsCased(cps[j])) return false;
        j = i + 1;
        while (j < cps.Length && IsCaseIgnorable(cps[j])) j++;
        return j == cps.Length || !IsCased(cps[j]);
    }

    /// <summary>
    /// Unicode "Cased": the letter case categories, anything with a case mapping, and the Other_Lowercase /
    /// Other_Uppercase characters that have neither (ª º and the squared/circled Latin capitals). Checked against
    /// Python 3.11 for every code point of Unicode 14.
    /// </summary>
    static bool IsCased(int cp)
    {
        if (cp is >= 0xD800 and <= 0xDFFF) return false;
        if (cp is 0xAA or 0xBA or (>= 0x1F130 and <= 0x1F149) or (>= 0x1F150 and <= 0x1F169) or (>= 0x1F170 and <= 0x1F189)) return true;
        var r = new Rune(cp);
        var cat = Rune.GetUnicodeCategory(r);
        return cat is UnicodeCategory.UppercaseLetter or UnicodeCategory.LowercaseLetter or UnicodeCategory.TitlecaseLetter
               || Rune.ToLowerInvariant(r) != r || Rune.ToUpperInvariant(r) != r;
    }

    /// <summary>Unicode "Case_Ignorable": Mn, Me, Cf, Lm, Sk and the word-internal punctuation of Word_Break.</summary>
    static bool IsCaseIgnorable(int cp)
    {
        if (cp is 0x27 or 0x2E or 0x3A or 0x5E or 0x60 or 0xA8 or 0xAD or 0xAF or 0xB4 or 0xB7 or 0xB8 or 0x387 or 0x55F or 0x5F4
            or 0x2018 or 0x2019 or 0x2024 or 0x2027 or 0xFE13 or 0xFE52 or 0xFE55 or 0xFF07 or 0xFF0E or 0xFF1A) return true;
        if (cp is >= 0xD800 and <= 0xDFFF) return false;
        return Rune.GetUnicodeCategory(new Rune(cp)) is UnicodeCategory.NonSpacingMark or UnicodeCategory.EnclosingMark
            or UnicodeCategory.Format or UnicodeCategory.ModifierLetter or UnicodeCategory.ModifierSymbol;
    }

    // ----------------------------------------------------------------------------------------------------------
    // html.unescape (Python 3 html module)

    static readonly Regex CharRef = new(@"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)", RegexOptions.CultureInvariant);

    /// <summary>HTML 3.2 names that HTML5 (and Python) also accept WITHOUT the trailing semicolon, even as a prefix ("&amp;ampx" → "&amp;x").</summary>
    static readonly HashSet<string> LegacyNames = new(
        ("AElig AMP Aacute Acirc Agrave Aring Atilde Auml COPY Ccedil ETH Eacute Ecirc Egrave Euml GT Iacute Icirc Igrave Iuml LT " +
         "Ntilde Oacute Ocirc Ograve Oslash Otilde Ouml QUOT REG THORN Uacute Ucirc Ugrave Uuml Yacute aacute acirc acute aelig " +
         "agrave amp aring atilde auml brvbar ccedil cedil cent copy curren deg divide eacute ecirc egrave eth euml frac12 frac14 " +
         "frac34 gt iacute icirc iexcl igrave iquest iuml laquo lt macr micro middot nbsp not ntilde oacute ocirc ograve ordf ordm " +
         "oslash otilde ouml para plusmn pound quot raquo reg sect shy sup1 sup2 sup3 szlig thorn times uacute ucirc ugrave uml " +
         "uuml yacute yen yuml").Split(' '), StringComparer.Ordinal);

    /// <summary>Numeric references HTML5 reinterprets (mostly the Windows-1252 C1 block).</summary>
    static readonly Dictionary<int, string> InvalidCharRefs = new()
    {
        [0x00] = "\uFFFD", [0x0D] = "\r", [0x80] = "\u20AC", [0x81] = "\x81", [0x82] = "\u201A", [0x83] = "\u0192", [0x84] = "\u201E",
        [0x85] = "\u2026", [0x86] = "\u2020", [0x87] = "\u2021", [0x88] = "\u02C6", [0x89] = "\u2030", [0x8A] = "\u0160", [0x8B] = "\u2039",
        [0x8C] = "\u0152", [0x8D] = "\x8D", [0x8E] = "\u017D", [0x8F] = "\x8F", [0x90] = "\x90", [0x91] = "\u2018", [0x92] = "\u2019",
        [0x93] = "\u201C", [0x94] = "\u201D", [0x95] = "\u2022", [0x96] = "\u2013", [0x97] = "\u2014", [0x98] = "\u02DC", [0x99] = "\u2122",
        [0x9A] = "\u0161", [0x9B] = "\u203A", [0x9C] = "\u0153", [0x9D] = "\x9D", [0x9E] = "\u017E", [0x9F] = "\u0178",
    };

    static bool IsInvalidCodePoint(long n) =>
        n is (>= 0x1 and <= 0x8) or 0xB or (>= 0xE and <= 0x1F) or (>= 0x7F and <= 0x9F) or (>= 0xFDD0 and <= 0xFDEF)
        || (n & 0xFFFE) == 0xFFFE;

    /// <summary>Python's <c>html.unescape</c> (numeric and named character references, HTML5 rules).</summary>
    public static string HtmlUnescape(string s) => s.Contains('&') ? CharRef.Replace(s, m => ReplaceCharRef(m.Groups[1].Value)) : s;

    static string ReplaceCharRef(string s)
    {
        if (s[0] == '#')
        {
            bool hex = s[1] is 'x' or 'X';
            var digits = s[(hex ? 2 : 1)..].TrimEnd(';');
            long num = 0;
            foreach (var c in digits)
            {
                num = num * (hex ? 16 : 10) + Convert.ToInt32(c.ToString(), 16);
                if (num > 0x10FFFF) break; // any larger value is replaced the same way
            }
            if (InvalidCharRefs.TryGetValue((int)Math.Min(num, int.MaxValue), out var r)) return r;
            if (num is >= 0xD800 and <= 0xDFFF || num > 0x10FFFF) return "\uFFFD";
            if (IsInvalidCodePoint(num)) return "";
            return char.ConvertFromUtf32((int)num);
        }
        if (NamedEntity(s) is { } exact) return exact;
        // The longest prefix (at least two characters) that is a legacy name, the rest kept verbatim.
        for (int x = s.Length - 1; x > 1; x--)
            if (NamedEntity(s[..x]) is { } v) return v + s[x..];
        return "&" + s;
    }

    /// <summary>The value of "name;" or of a legacy "name" (no semicolon), or null.</summary>
    static string? NamedEntity(string name)
    {
        if (!name.EndsWith(';')) return LegacyNames.Contains(name) ? WebUtility.HtmlDecode("&" + name + ";") : null;
        // HTML5 moved these two to the mathematical angle brackets.
        if (name == "lang;") return "\u27E8";
        if (name == "rang;") return "\u27E9";
        var body = name[..^1];
        if (body.Length == 0 || body.Any(c => !char.IsAsciiLetterOrDigit(c))) return null;
        var decoded = WebUtility.HtmlDecode("&" + name);
        return decoded == "&" + name ? null : decoded;
    }

    // ----------------------------------------------------------------------------------------------------------
    // Pre-tokenizer: the official regex
    //   <start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+   (IGNORECASE)
    // evaluated on code points (a .NET Regex would see surrogate halves, not letters, outside the BMP).

    static readonly string[] Contractions = { "'s", "'t", "'re", "'ve", "'m", "'ll", "'d" };

    enum CharClass { Letter, Number, Other, Skip }

    static CharClass Classify(int cp)
    {
        // U+0345 (combining ypogegrammeni) case-folds to ι, so under IGNORECASE the official regex neither counts it as
        // a letter nor as "other": it is dropped like whitespace.
        if (IsRegexSpace(cp) || cp == 0x345) return CharClass.Skip;
        if (cp is >= 0xD800 and <= 0xDFFF) return CharClass.Other;
        return Rune.GetUnicodeCategory(new Rune(cp)) switch
        {
            UnicodeCategory.UppercaseLetter or UnicodeCategory.LowercaseLetter or UnicodeCategory.TitlecaseLetter
                or UnicodeCategory.ModifierLetter or UnicodeCategory.OtherLetter => CharClass.Letter,
            UnicodeCategory.DecimalDigitNumber or UnicodeCategory.LetterNumber or UnicodeCategory.OtherNumber => CharClass.Number,
            _ => CharClass.Other,
        };
    }

    /// <summary>Case-insensitive match of one code point against a pattern character (the regex's IGNORECASE).</summary>
    static bool SameIgnoringCase(int cp, char p) =>
        cp == p || cp == char.ToUpperInvariant(p) || (p == 's' && cp == 0x17F) || (p == 'k' && cp == 0x212A);

    static bool MatchesAt(int[] cps, int i, string literal)
    {
        if (i + literal.Length > cps.Length) return false;
        for (int k = 0; k < literal.Length; k++)
            if (!SameIgnoringCase(cps[i + k], literal[k])) return false;
        return true;
    }

    /// <summary>The pieces <c>regex.findall(pat, text)</c> returns, in order.</summary>
    public static IEnumerable<string> PreTokenize(string text)
    {
        var cps = CodePoints(text).ToArray();
        int i = 0;
        while (i < cps.Length)
        {
            int end = -1;
            foreach (var lit in Specials.Concat(Contractions))
                if (MatchesAt(cps, i, lit)) { end = i + lit.Length; break; }
            if (end < 0)
            {
                var cls = Classify(cps[i]);
                if (cls == CharClass.Skip) { i++; continue; }
                end = i + 1;
                if (cls != CharClass.Number)
                    while (end < cps.Length && Classify(cps[end]) == cls) end++;
            }
            var sb = new StringBuilder();
            for (int k = i; k < end; k++) AppendCodePoint(sb, cps[k]);
            yield return sb.ToString();
            i = end;
        }
    }

    // ----------------------------------------------------------------------------------------------------------
    // Byte-pair encoding

    /// <summary>
    /// Official <c>bytes_to_unicode</c>: printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onwards,
    /// so that every byte has a visible, non-space symbol. Returned as (byte, symbol) in the official dict's insertion
    /// order (printable ranges first), which is also the order of the first 256 vocabulary entries.
    /// </summary>
    static (int Byte, char Symbol)[] BytesToUnicode()
    {
        var bs = new List<int>();
        bs.AddRange(Enumerable.Range('!', '~' - '!' + 1));
        bs.AddRange(Enumerable.Range('¡', '¬' - '¡' + 1));
        bs.AddRange(Enumerable.Range('®', 'ÿ' - '®' + 1));
        var cs = new List<int>(bs);
        int n = 0;
        for (int b = 0; b < 256; b++)
            if (!bs.Contains(b)) { bs.Add(b); cs.Add(256 + n); n++; }
        return bs.Zip(cs, (b, c) => (b, (char)c)).ToArray();
    }

    static char[] BuildByteEncoder()
    {
        var table = new char[256];
        foreach (var (b, c) in BytesToUnicode()) table[b] = c;
        return table;
    }

    /// <summary>Merges the symbols of one byte-encoded word by rank until no ranked pair remains (official <c>bpe</c>).</summary>
    string Bpe(string token)
    {
        lock (_cacheLock)
            if (_cache.TryGetValue(token, out var hit)) return hit;

        var word = new List<string>(token.Length);
        for (int i = 0; i < token.Length - 1; i++) word.Add(token[i].ToString());
        word.Add(token[^1] + "</w>");
        if (word.Count == 1) return token + "</w>";

        while (true)
        {
            (string, string)? best = null;
            int bestRank = int.MaxValue;
            for (int i = 0; i < word.Count - 1; i++)
                if (_bpeRanks.TryGetValue((word[i], word[i + 1]), out var r) && r < bestRank) { bestRank = r; best = (word[i], word[i + 1]); }
            if (best is not var (first, second)) break;
            var merged = new List<string>(word.Count);
            int k = 0;
            while (k < word.Count)
            {
                int j = word.IndexOf(first, k);
                if (j < 0) { merged.AddRange(word.Skip(k)); break; }
                merged.AddRange(word.Skip(k).Take(j - k));
                k = j;
                if (k < word.Count - 1 && word[k + 1] == second) { merged.Add(first + second); k += 2; }
                else { merged.Add(word[k]); k++; }
            }
            word = merged;
            if (word.Count == 1) break;
        }
        var result = string.Join(' ', word);
        lock (_cacheLock) _cache[token] = result;
        return result;
    }

    // ----------------------------------------------------------------------------------------------------------

    /// <summary>Code points of a UTF-16 string; an unpaired surrogate is passed through as its own value (Python keeps it too).</summary>
    static IEnumerable<int> CodePoints(string s)
    {
        for (int i = 0; i < s.Length; i++)
        {
            char c = s[i];
            if (char.IsHighSurrogate(c) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]))
            {
                yield return char.ConvertToUtf32(c, s[i + 1]);
                i++;
            }
            else yield return c;
        }
    }

    static void AppendCodePoint(StringBuilder sb, int cp)
    {
        if (cp is >= 0xD800 and <= 0xDFFF) sb.Append((char)cp);
        else sb.Append(char.ConvertFromUtf32(cp));
    }
}
