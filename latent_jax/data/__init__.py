"""Datasets for latent reasoning: readers/writers, generators (ProsQA, ProntoQA, multiplication), GSM8k
conversion and the ``load_dataset`` registry. Pure Python (numpy-free); see ``registry.py`` for the table."""
from .gsm8k import ConversionReport, convert_answer, convert_gsm8k
from .multiplication import generate_multiplication, multiplication_line, multiplication_record, parse_operands
from .paths import data_dirs, find_data_file
from .prontoqa import (generate_prontoqa, parse_prontoqa_question, parse_prontoqa_rule, prontoqa_stats,
                       verify_prontoqa)
from .prosqa import RUNGS, GraphSize, generate_prosqa, graph_size, parse_prosqa_question, prosqa_stats, verify_prosqa
from .records import (
    DataFormatError,
    Record,
    format_icot_line,
    parse_icot_line,
    read_icot_text,
    read_json_records,
    read_records,
    split_steps,
    validate_record,
    write_icot_text,
    write_json_records,
)
from .registry import DATASETS, DatasetInfo, canonical_name, load_dataset
from .stats import ks_2samp
from .symbolic import (ENCODINGS, parse_symbolic_question, symbolic_records, symbolic_vocab, to_symbolic,
                       verify_symbolic)

__all__ = [
    "DATASETS", "ENCODINGS", "RUNGS", "GraphSize", "graph_size", "parse_symbolic_question", "symbolic_records",
    "symbolic_vocab", "to_symbolic", "verify_symbolic", "ConversionReport", "DataFormatError", "DatasetInfo", "Record", "canonical_name", "convert_answer",
    "convert_gsm8k", "data_dirs", "find_data_file", "format_icot_line", "generate_multiplication",
    "generate_prontoqa", "generate_prosqa", "ks_2samp", "load_dataset", "multiplication_line",
    "multiplication_record", "parse_icot_line", "parse_operands", "parse_prontoqa_question", "parse_prontoqa_rule",
    "parse_prosqa_question", "prontoqa_stats", "prosqa_stats", "read_icot_text", "read_json_records",
    "read_records", "split_steps", "validate_record", "verify_prontoqa", "verify_prosqa", "write_icot_text",
    "write_json_records",
]
