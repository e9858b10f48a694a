
BoutputJPLœŽ@^KÁpA2ÀÕ¼gAv”k@|–œ¿›VÁ)°A€{M?>¯Á­ù—@N	ÁTNÀè‰qAFWZ@Àåa¿ü1"Á†L$AÞW­?%	ªÁ